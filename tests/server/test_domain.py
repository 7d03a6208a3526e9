"""Domain rules: the state machine, configuration ranges, list filters, page
tokens and failure classification."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brightrun_server.domain import config as cfg
from brightrun_server.domain.errors import InvalidArgument
from brightrun_server.domain.failures import FailureClass, default_rulebook, load_rulebook
from brightrun_server.domain.ids import new_id, ulid
from brightrun_server.domain.listing import decode_page_token, encode_page_token, parse_filter
from brightrun_server.domain.states import ALLOWED, TERMINAL, IllegalTransition, JobState, transition

# ---------------------------------------------------------------- state machine

HAPPY_PATH = [
    JobState.QUEUED,
    JobState.PROVISIONING,
    JobState.PREPROCESSING,
    JobState.MODEL_LOADING,
    JobState.TRAINING,
    JobState.FINALIZATION,
    JobState.COMPLETED,
]


def test_the_happy_path_is_legal() -> None:
    for current, target in itertools.pairwise(HAPPY_PATH):
        assert transition("job", current, target) is target


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobState, JobState)))
def test_every_unlisted_transition_is_impossible(current: JobState, target: JobState) -> None:
    if target in ALLOWED[current]:
        assert transition("job_x", current, target) is target
        return
    with pytest.raises(IllegalTransition) as caught:
        transition("job_x", current, target)
    assert caught.value.code == "FAILED_PRECONDITION"
    assert caught.value.reason == "JOB_STATE_CONFLICT"
    assert caught.value.metadata == {"job_id": "job_x", "state": current.value, "target_state": target.value}


def test_terminal_states_are_final_and_every_running_state_can_fail_or_be_cancelled() -> None:
    for state in TERMINAL:
        assert ALLOWED[state] == frozenset()
    for state in HAPPY_PATH[1:-1]:
        assert JobState.FAILED in ALLOWED[state]
        assert JobState.CANCELLING in ALLOWED[state]
    assert ALLOWED[JobState.CANCELLING] == {JobState.CANCELLED}
    assert JobState.CANCELLED in ALLOWED[JobState.QUEUED]


@given(st.lists(st.sampled_from(list(JobState)), max_size=30))
def test_random_walks_only_ever_take_allowed_steps(targets: list[JobState]) -> None:
    state = JobState.QUEUED
    for target in targets:
        try:
            new = transition("job", state, target)
        except IllegalTransition:
            assert target not in ALLOWED[state]
        else:
            assert target in ALLOWED[state]
            state = new


# ---------------------------------------------------------------- configuration


def test_presets_match_the_spec() -> None:
    expected = {
        cfg.PresetName.CONSERVATIVE: (8, 1e-4, 2),
        cfg.PresetName.BALANCED: (16, 2e-4, 3),
        cfg.PresetName.AGGRESSIVE: (32, 5e-4, 5),
    }
    for name, (rank, lr, epochs) in expected.items():
        p = cfg.PRESETS[name]
        assert (p.lora_rank, p.learning_rate, p.epochs) == (rank, lr, epochs)
        assert p.lora_alpha == 2 * rank
        assert (p.lora_dropout, p.batch_size, p.warmup_ratio, p.max_seq_length) == (0.05, 4, 0.03, 2048)
        assert p.lr_scheduler == "cosine"
    assert cfg.resolve(None, {}).preset is cfg.PresetName.BALANCED


BOUNDS = [
    ("lora_rank", 4, 64, 3, 65),
    ("lora_alpha", 8, 128, 7, 129),
    ("lora_dropout", 0.0, 0.2, -0.01, 0.21),
    ("epochs", 1, 10, 0, 11),
    ("warmup_ratio", 0.0, 0.1, -0.001, 0.11),
    ("learning_rate", 1e-7, 1e-2, 0.0, 0.011),
    ("gradient_accumulation_steps", 1, 64, 0, 65),
    ("validation_split", 0.0, 0.5, -0.1, 0.6),
]


@pytest.mark.parametrize(("field", "lo", "hi", "below", "above"), BOUNDS)
def test_range_bounds_are_inclusive_and_violations_name_field_and_range(
    field: str, lo: float, hi: float, below: float, above: float
) -> None:
    assert getattr(cfg.resolve(None, {field: lo}).params, field) == lo
    assert getattr(cfg.resolve(None, {field: hi}).params, field) == hi
    for bad in (below, above):
        with pytest.raises(InvalidArgument) as caught:
            cfg.resolve(None, {field: bad})
        (violation,) = caught.value.violations
        assert violation.field == f"overrides.{field}"
        rule = cfg.RANGES[field]
        assert rule.describe() in violation.description
        assert str(bad).rstrip("0").rstrip(".") in violation.description or f"{bad:g}" in violation.description


@pytest.mark.parametrize(
    ("field", "allowed"), [("batch_size", (1, 2, 4, 8)), ("max_seq_length", (512, 1024, 2048, 4096))]
)
def test_enumerated_fields_accept_only_their_values(field: str, allowed: tuple[int, ...]) -> None:
    for value in allowed:
        assert getattr(cfg.resolve(None, {field: value}).params, field) == value
    for value in (0, 3, 5, 1000, 100_000, -1):
        with pytest.raises(InvalidArgument) as caught:
            cfg.resolve(None, {field: value})
        assert caught.value.violations[0].field == f"overrides.{field}"
        assert "one of " + ", ".join(map(str, allowed)) in caught.value.violations[0].description


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as caught:
        cfg.resolve(None, {"lora_rank": 100, "epochs": 0, "batch_size": 3, "learning_rate": math.nan})
    assert {v.field for v in caught.value.violations} == {
        "overrides.lora_rank",
        "overrides.epochs",
        "overrides.batch_size",
        "overrides.learning_rate",
    }


def test_alpha_follows_rank_unless_overridden_and_custom_flag() -> None:
    r = cfg.resolve(None, {"lora_rank": 8})
    assert (r.params.lora_rank, r.params.lora_alpha, r.custom) == (8, 16, True)
    r = cfg.resolve(None, {"lora_rank": 8, "lora_alpha": 8})
    assert r.params.lora_alpha == 8
    # Overriding with the preset's own value is not custom.
    assert cfg.resolve(cfg.PresetName.CONSERVATIVE, {"lora_rank": 8, "epochs": 2}).custom is False
    assert cfg.resolve(None, {}).custom is False


def test_target_modules_are_checked() -> None:
    assert cfg.resolve(None, {"target_modules": ["q_proj", "v_proj"]}).params.target_modules == ("q_proj", "v_proj")
    for bad in (["q proj"], ["q_proj", "q_proj"], ["x"] * 33, ["1abc"]):
        with pytest.raises(InvalidArgument) as caught:
            cfg.resolve(None, {"target_modules": bad})
        assert caught.value.violations[0].field == "overrides.target_modules"


def test_fingerprint_covers_what_is_trained_and_nothing_else() -> None:
    base = cfg.resolve(None, {}).params
    fp = cfg.fingerprint("sha", "model", base)
    assert fp == cfg.fingerprint("sha", "model", base)
    assert fp != cfg.fingerprint("other", "model", base)
    assert fp != cfg.fingerprint("sha", "other", base)
    assert fp != cfg.fingerprint("sha", "model", base.model_copy(update={"lora_rank": 8}))
    assert fp == cfg.fingerprint("sha", "model", base.model_copy(update={"checkpoint_interval_steps": 7}))


@given(
    st.dictionaries(
        st.sampled_from(sorted(cfg.RANGES)),
        st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans()),
        max_size=6,
    )
)
@settings(max_examples=300)
def test_resolution_either_yields_valid_params_or_names_every_bad_field(overrides: dict[str, object]) -> None:
    try:
        resolved = cfg.resolve(None, overrides)
    except InvalidArgument as e:
        named = {v.field.removeprefix("overrides.") for v in e.violations}
        bad = {k for k, v in overrides.items() if cfg.RANGES[k].check(v) is not None}
        assert named == bad
        return
    for key in overrides:
        assert cfg.RANGES[key].check(getattr(resolved.params, key)) is None


# ---------------------------------------------------------------- filters and tokens

FIELDS = {"state": lambda v: v.lower(), "name": str, "n": int}


def test_filter_grammar() -> None:
    parsed = parse_filter('state = TRAINING AND name != "a \\"b\\"" and n >= 3', FIELDS)
    assert [(c.field, c.op, c.value) for c in parsed] == [
        ("state", "=", "training"),
        ("name", "!=", 'a "b"'),
        ("n", ">=", 3),
    ]
    assert parse_filter("", FIELDS) == []
    assert parse_filter("   ", FIELDS) == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus = 1", "unknown field 'bogus'"),
        ("state", "incomplete comparison"),
        ("state = ", "incomplete comparison"),
        ("state = a OR n = 1", "expected AND"),
        ("n = x", "bad value for n"),
        ("state ~ a", "unexpected character"),
        ("= 3", "expected a field name"),
    ],
)
def test_bad_filters_say_what_and_where(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text, FIELDS)
    assert caught.value.reason == "FILTER_INVALID"
    assert fragment in caught.value.violations[0].description
    assert "position" in caught.value.metadata


@given(st.text(max_size=60))
def test_filter_parser_never_crashes(text: str) -> None:
    """Any text either parses or raises InvalidArgument naming the filter."""
    try:
        parse_filter(text, FIELDS)
    except InvalidArgument as e:
        violations = e.violations
    else:
        violations = [None]
    assert violations


def test_page_tokens_are_bound_to_their_query() -> None:
    token = encode_page_token(["2026-01-01T00:00:00+00:00", "job_1"], "jobs|state = queued")
    assert decode_page_token(token, "jobs|state = queued") == ["2026-01-01T00:00:00+00:00", "job_1"]
    assert decode_page_token("", "anything") is None
    for bad_query, bad_token in [("jobs|other", token), ("jobs|state = queued", "garbage!"), ("x", token[:-3])]:
        with pytest.raises(InvalidArgument) as caught:
            decode_page_token(bad_token, bad_query)
        assert caught.value.reason == "PAGE_TOKEN_INVALID"
        assert caught.value.violations[0].field == "page_token"


def test_ids_sort_by_creation_and_are_unique() -> None:
    ids = [ulid() for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert new_id("job").startswith("job_")


# ---------------------------------------------------------------- classification


def test_every_failure_class_has_a_policy_and_the_rulebook_loads() -> None:
    book = default_rulebook()
    assert set(book.policies) == set(FailureClass)
    assert book.policy(FailureClass.OUT_OF_MEMORY).retryable is False
    assert book.policy(FailureClass.DATASET_FORMAT).retryable is False
    assert book.policy(FailureClass.SPOT_INTERRUPTION).recovery == "resume"
    assert book.policy(FailureClass.TRANSIENT).retryable is True


@pytest.mark.parametrize(
    ("exception_type", "message", "expected"),
    [
        ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 20.00 MiB", FailureClass.OUT_OF_MEMORY),
        ("RuntimeError", "CUDA out of memory.", FailureClass.OUT_OF_MEMORY),
        ("MemoryError", "", FailureClass.OUT_OF_MEMORY),
        (
            "RuntimeError",
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8",
            FailureClass.OUT_OF_MEMORY,
        ),
        ("OSError", "[Errno 28] No space left on device: '/ckpt'", FailureClass.DISK_FULL),
        ("OSError", "Disk quota exceeded", FailureClass.DISK_FULL),
        ("PermissionError", "[Errno 13] Permission denied: '/x'", FailureClass.FILE_IO),
        ("brightrun.validation.DatasetFormatError", "line 3: malformed JSON", FailureClass.DATASET_FORMAT),
        (
            "OSError",
            "meta-llama/Nope is not a local folder and is not a valid model identifier",
            FailureClass.MODEL_UNAVAILABLE,
        ),
        ("RepositoryNotFoundError", "404", FailureClass.MODEL_UNAVAILABLE),
        ("TimeoutError", "timed out", FailureClass.TRANSIENT),
        ("HTTPError", "429 Too Many Requests", FailureClass.TRANSIENT),
        ("LossDivergenceError", "loss is nan at step 12", FailureClass.LOSS_DIVERGENCE),
        ("KeyError", "'x'", FailureClass.INTERNAL),
    ],
)
def test_failure_rules(exception_type: str, message: str, expected: FailureClass) -> None:
    result = default_rulebook().classify(exception_type=exception_type, message=message, stage="training")
    assert result.failure_class is expected
    assert result.evidence


def test_process_deaths_without_a_report() -> None:
    book = default_rulebook()
    assert book.classify(signal=9).failure_class is FailureClass.WORKER_LOST
    assert book.classify(exit_code=1).failure_class is FailureClass.INTERNAL
    assert book.classify(exit_code=None).failure_class is FailureClass.WORKER_LOST
    assert book.classify(stopped_unrequested=True).failure_class is FailureClass.SPOT_INTERRUPTION


def test_rules_are_data(tmp_path: pytest.TempPathFactory) -> None:
    import json
    from pathlib import Path

    source = json.loads((Path(cfg.__file__).parent / "failure_rules.json").read_text())
    source["rules"].insert(0, {"class": "transient", "message": "flaky widget"})
    path = Path(str(tmp_path)) / "rules.json"
    path.write_text(json.dumps(source))
    book = load_rulebook(path)
    assert (
        book.classify(exception_type="ValueError", message="the flaky widget broke").failure_class
        is FailureClass.TRANSIENT
    )


# ---------------------------------------------------------------- queue planning and fix summaries


def test_a_promotion_delays_only_the_jobs_it_passes() -> None:
    from datetime import UTC, datetime, timedelta

    from brightrun_server.domain import queueing

    now = datetime(2025, 1, 1, tzinfo=UTC)
    hour = timedelta(hours=1)
    jobs = {name: queueing.Waiting(name, "local", hour) for name in "abcd"}

    def plan(order: str) -> list[queueing.Planned]:
        running = [queueing.Running("local", hour)]
        return queueing.plan(now, {"local": 1}, running, [jobs[n] for n in order], buffer=timedelta(minutes=5))

    delayed = queueing.delays(plan("abcd"), plan("bacd"))
    assert delayed == {"a": timedelta(hours=1, minutes=5)}, "c and d keep their place and their start"
    # A later start without a worse place (e.g. another clock) is no delay caused by the promotion.
    later = [
        queueing.Planned(p.job_id, p.position, p.start + timedelta(milliseconds=3), p.confidence) for p in plan("abcd")
    ]
    assert queueing.delays(plan("abcd"), later) == {}


def test_a_fix_summary_states_a_memory_change_without_a_sign() -> None:
    from brightrun_server.domain import fixes

    fix = fixes.Fix("reduce_batch_size", "Reduce batch size to 4", "")
    less = fixes.Effect(memory_bytes=15 * 2**30, memory_bytes_before=30 * 2**30)
    more = fixes.Effect(memory_bytes=33 * 2**30, memory_bytes_before=30 * 2**30)
    assert fixes._summary(fix, less) == "peak memory 15.0 GiB (50% less)"
    assert fixes._summary(fix, more) == "peak memory 33.0 GiB (10% more)"
    assert fixes._summary(fix, fixes.Effect()) == "Reduce batch size to 4"
