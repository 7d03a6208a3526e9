"""Property tests: the validator never fails, accepts every valid dataset exactly, and
pins each injected error to the path where it was injected."""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brightrun.validation import (
    DatasetFormat,
    DatasetFormatError,
    Example,
    IssueType,
    Message,
    _engine,
    issues_to_csv,
    iter_examples,
    validate_file,
)
from brightrun.validation.report import ValidationReport

from .conftest import assert_positions_agree

#: BRIGHTRUN_FUZZ_EXAMPLES=2000 for a deep run; the default keeps the suite fast.
SETTINGS = settings(
    max_examples=int(os.environ.get("BRIGHTRUN_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_counter = itertools.count()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props")


def _write(workdir: Path, data: bytes, suffix: str = ".jsonl") -> Path:
    path = workdir / f"f{next(_counter)}{suffix}"
    path.write_bytes(data)
    return path


def _check_invariants(report: ValidationReport, path: Path) -> None:
    """What every report satisfies, whatever the input."""
    size = path.stat().st_size
    assert IssueType.INTERNAL_ERROR.value not in report.counts_by_type, report.issues
    assert report.critical_count + report.warning_count == sum(report.counts_by_type.values())
    assert report.critical_count == sum(report.critical_by_type.values())
    assert 0 <= report.quality_score <= 100
    stored: dict[str, int] = {}
    for issue in report.issues:
        stored[issue.type] = stored.get(issue.type, 0) + 1
        assert issue.severity in ("critical", "warning")
        assert issue.type in {t.value for t in IssueType}
        if issue.line is not None:
            assert issue.line >= 1
            assert issue.column is not None
            assert issue.column >= 1
            assert issue.byte_offset is not None
            assert 0 <= issue.byte_offset <= size
            excerpt = report.context(issue)
            assert excerpt is not None
            assert [x.number for x in excerpt.lines if x.marked] == [issue.line]
    for t, n in stored.items():
        assert n <= report.counts_by_type[t]
    assert_positions_agree(path, report.issues)
    # Everything a report holds can be printed, exported and serialised.
    json.loads(report.to_json())
    "".join(issues_to_csv(report.issues)).encode("utf-8")
    assert report.stats.training_pairs <= report.stats.conversations or (report.format is DatasetFormat.CONVERSATIONS)


def _check_iter_agrees(report: ValidationReport, path: Path) -> None:
    """The trainer's reader raises exactly when validation finds a critical error."""
    try:
        n = sum(1 for _ in iter_examples(path, report.format))
    except DatasetFormatError:
        assert report.critical_count > 0
    else:
        assert report.critical_count == 0, report.issues
        assert n == report.stats.training_pairs


FORMATS = st.sampled_from([None, *DatasetFormat])


@SETTINGS
@given(data=st.binary(max_size=3000), fmt=FORMATS)
def test_arbitrary_bytes_never_crash(workdir: Path, data: bytes, fmt: DatasetFormat | None) -> None:
    path = _write(workdir, data)
    report = validate_file(path, format=fmt)
    _check_invariants(report, path)
    _check_iter_agrees(report, path)


JSONISH = st.text(alphabet=list('{}[]":,0123456789.-eE \n\t\\untrfalsmgoidcpq_\u00e9\u2603'), max_size=400)


@SETTINGS
@given(text=JSONISH, fmt=FORMATS)
def test_json_like_garbage_never_crashes(workdir: Path, text: str, fmt: DatasetFormat | None) -> None:
    path = _write(workdir, text.encode("utf-8"))
    report = validate_file(path, format=fmt)
    _check_invariants(report, path)
    _check_iter_agrees(report, path)


KEYS = [
    "messages",
    "role",
    "content",
    "conversations",
    "training_pairs",
    "user_query",
    "target_response",
    "prompt_context",
    "scaffolding_metadata",
    "conversation_id",
    "instruction",
    "input",
    "output",
    "weight",
    "id",
    "quality_score",
    "persona",
    "dataset_metadata",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["user", "assistant", "system", "", "  "])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=25,
)


@SETTINGS
@given(
    values=st.lists(JSON_VALUES, min_size=0, max_size=6),
    fmt=FORMATS,
    as_document=st.booleans(),
    indent=st.sampled_from([None, 2]),
)
def test_arbitrary_json_never_crashes(
    workdir: Path, values: list[Any], fmt: DatasetFormat | None, as_document: bool, indent: int | None
) -> None:
    if as_document:
        text = json.dumps({"conversations": values}, indent=indent)
    else:
        text = "\n".join(json.dumps(v, indent=indent) for v in values)
    path = _write(workdir, text.encode("utf-8"))
    report = validate_file(path, format=fmt)
    _check_invariants(report, path)
    _check_iter_agrees(report, path)


# ---------------------------------------------------------------------------
# Valid datasets.

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=0, max_size=30)


def _content(prefix: str) -> st.SearchStrategy[str]:
    """Unique (by prefix), never empty or only whitespace."""
    return TEXT.map(lambda t: f"{prefix} {t}")


@st.composite
def chat_record(draw: st.DrawFn, i: int) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_content(f"s{i}"))})
    for turn in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(_content(f"u{i}.{turn}"))})
        messages.append({"role": "assistant", "content": draw(_content(f"a{i}.{turn}"))})
    record: dict[str, Any] = {"messages": messages}
    if draw(st.booleans()):
        record["weight"] = draw(st.sampled_from([0, 0.5, 1, 2.5]))
    if draw(st.booleans()):
        record["id"] = f"chat-{i}"
    return record


@st.composite
def conversation(draw: st.DrawFn, i: int) -> dict[str, Any]:
    pairs = []
    for k in range(draw(st.integers(1, 3))):
        pair: dict[str, Any] = {
            "user_query": draw(_content(f"q{i}.{k}")),
            "target_response": draw(_content(f"r{i}.{k}")),
        }
        context = draw(st.sampled_from(["absent", "null", "empty", "text"]))
        if context == "null":
            pair["prompt_context"] = None
        elif context == "empty":
            pair["prompt_context"] = ""
        elif context == "text":
            pair["prompt_context"] = draw(_content(f"c{i}.{k}"))
        if draw(st.booleans()):
            meta: dict[str, Any] = {
                "persona": draw(st.sampled_from(["anxious_planner", "pragmatic_optimist"])),
                "emotional_arc": draw(st.sampled_from(["worry_to_confidence", "conflict_to_alignment"])),
                "topic": draw(st.sampled_from(["retirement", "debt", "budgeting"])),
            }
            # Partial metadata and extra fields (text or numbers) are valid too.
            shape = draw(st.sampled_from(["full", "no_topic", "extra_number", "extra_text"]))
            if shape == "no_topic":
                del meta["topic"]
            elif shape == "extra_number":
                meta["intensity"] = draw(st.integers(0, 5) | st.floats(0, 1))
            elif shape == "extra_text":
                meta["tone"] = draw(st.sampled_from(["warm", "direct"]))
            pair["scaffolding_metadata"] = meta
        pairs.append(pair)
    return {"conversation_id": f"conv_{i}", "training_pairs": pairs}


@st.composite
def instruction_record(draw: st.DrawFn, i: int) -> dict[str, Any]:
    record: dict[str, Any] = {"instruction": draw(_content(f"i{i}")), "output": draw(_content(f"o{i}"))}
    extra = draw(st.sampled_from(["absent", "null", "empty", "text"]))
    if extra == "null":
        record["input"] = None
    elif extra == "empty":
        record["input"] = ""
    elif extra == "text":
        record["input"] = draw(_content(f"x{i}"))
    return record


RECORDS = {
    DatasetFormat.CHAT_JSONL: chat_record,
    DatasetFormat.CONVERSATIONS: conversation,
    DatasetFormat.INSTRUCTION_JSONL: instruction_record,
}


@st.composite
def dataset(draw: st.DrawFn, fmt: DatasetFormat, min_size: int = 1) -> list[dict[str, Any]]:
    n = draw(st.integers(min_size, 6))
    return [draw(RECORDS[fmt](i)) for i in range(n)]


def _expected_examples(fmt: DatasetFormat, records: list[dict[str, Any]]) -> list[Example]:
    out: list[Example] = []
    for i, r in enumerate(records):
        if fmt is DatasetFormat.CHAT_JSONL:
            out.append(
                Example(
                    messages=tuple(Message(m["role"], m["content"]) for m in r["messages"]),
                    index=i,
                    conversation_id=r.get("id"),
                    weight=float(r.get("weight", 1.0)),
                )
            )
        elif fmt is DatasetFormat.INSTRUCTION_JSONL:
            extra = r.get("input") or ""
            user = f"{r['instruction']}\n\n{extra}" if extra.strip() else r["instruction"]
            out.append(
                Example(
                    messages=(Message("user", user), Message("assistant", r["output"])),
                    index=i,
                )
            )
        else:
            for k, p in enumerate(r["training_pairs"]):
                context = p.get("prompt_context") or ""
                system = (Message("system", context),) if context.strip() else ()
                out.append(
                    Example(
                        messages=(
                            *system,
                            Message("user", p["user_query"]),
                            Message("assistant", p["target_response"]),
                        ),
                        index=i,
                        conversation_id=r["conversation_id"],
                        pair_index=k,
                        metadata={
                            key: value if isinstance(value, str) else str(value)
                            for key, value in p.get("scaffolding_metadata", {}).items()
                        },
                    )
                )
    return out


LAYOUTS = ["jsonl", "jsonl_crlf_blank_lines", "document", "document_pretty", "array"]


def _serialise(fmt: DatasetFormat, records: list[dict[str, Any]], layout: str, ascii_only: bool) -> bytes:
    if fmt is not DatasetFormat.CONVERSATIONS and layout not in ("jsonl", "jsonl_crlf_blank_lines"):
        layout = "jsonl"
    if layout == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records)
    elif layout == "jsonl_crlf_blank_lines":
        text = "\r\n\r\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in records)
    elif layout == "document":
        text = json.dumps({"conversations": records}, ensure_ascii=ascii_only)
    elif layout == "document_pretty":
        text = json.dumps(
            {"dataset_metadata": {"quality_score": 3.5}, "conversations": records},
            indent=2,
            ensure_ascii=ascii_only,
        )
    else:
        text = json.dumps(records, indent=1, ensure_ascii=ascii_only)
    return text.encode("utf-8")


#: Read sizes: byte by byte, a few bytes, the defaults.
BLOCKS = st.sampled_from([1, 5, 64, None])


@contextmanager
def read_sizes(block: int | None) -> Iterator[None]:
    """JSON Lines blocks and document reads of ``block`` bytes (None: the defaults)."""
    with pytest.MonkeyPatch.context() as mp:
        if block is not None:
            mp.setattr(_engine.Engine, "BLOCK", block)
            mp.setattr(_engine._DocReader, "CHUNK", block)
            mp.setattr(_engine._DocReader, "LOOKAHEAD", block)
            mp.setattr(_engine._DocReader, "PIECE", max(1, block // 2))
        yield


@SETTINGS
@given(
    data=st.data(),
    fmt=st.sampled_from(list(DatasetFormat)),
    layout=st.sampled_from(LAYOUTS),
    ascii_only=st.booleans(),
    block=BLOCKS,
)
def test_valid_datasets_have_no_issues_and_read_back_exactly(
    workdir: Path, data: st.DataObject, fmt: DatasetFormat, layout: str, ascii_only: bool, block: int | None
) -> None:
    records = data.draw(dataset(fmt))
    path = _write(workdir, _serialise(fmt, records, layout, ascii_only))
    with read_sizes(block):
        report = validate_file(path)  # the format is detected
        examples = list(iter_examples(path))
    assert report.format is fmt
    assert report.issues == [], report.issues
    expected = _expected_examples(fmt, records)
    assert report.stats.training_pairs == len(expected)
    assert report.stats.conversations == len(records)
    assert report.stats.messages == sum(len(e.messages) for e in expected)
    assert examples == expected
    for name in ("persona", "emotional_arc", "topic"):
        counted = Counter(e.metadata[name] for e in expected if name in e.metadata)
        assert getattr(report.stats, name) == dict(counted), name
    full = [e.metadata for e in expected if {"persona", "emotional_arc", "topic"} <= e.metadata.keys()]
    assert report.stats.persona_arc == dict(Counter(f"{m['persona']} x {m['emotional_arc']}" for m in full))


# ---------------------------------------------------------------------------
# Mutations: one injected error, reported at its path.


def _mutate_chat(draw: st.DrawFn, records: list[dict[str, Any]], i: int) -> tuple[str, str, str]:
    r = records[i]
    msgs = r["messages"]
    j = draw(st.integers(0, len(msgs) - 1))
    where = f"[{i}].messages[{j}]"
    kind = draw(
        st.sampled_from(
            [
                "del_content",
                "null_content",
                "int_content",
                "del_role",
                "bad_role",
                "empty_assistant",
                "empty_messages",
                "del_messages",
                "messages_not_list",
                "drop_final_assistant",
                "duplicate",
            ]
        )
    )
    if kind == "del_content":
        del msgs[j]["content"]
        return "missing_required_field", f"{where}.content", "critical"
    if kind == "null_content":
        msgs[j]["content"] = None
        return "missing_required_field", f"{where}.content", "critical"
    if kind == "int_content":
        msgs[j]["content"] = 7
        return "invalid_data_type", f"{where}.content", "critical"
    if kind == "del_role":
        del msgs[j]["role"]
        return "missing_required_field", f"{where}.role", "critical"
    if kind == "bad_role":
        msgs[j]["role"] = "narrator"
        return "unknown_role", f"{where}.role", "critical"
    if kind == "empty_assistant":
        j = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
        msgs[j]["content"] = draw(st.sampled_from(["", " ", "\n\t"]))
        return "empty_content", f"[{i}].messages[{j}].content", "critical"
    if kind == "empty_messages":
        r["messages"] = []
        return "empty_array", f"[{i}].messages", "critical"
    if kind == "del_messages":
        del r["messages"]
        return "missing_required_field", f"[{i}].messages", "critical"
    if kind == "messages_not_list":
        r["messages"] = {"role": "user", "content": "x"}
        return "invalid_data_type", f"[{i}].messages", "critical"
    if kind == "drop_final_assistant":
        msgs.pop()
        if any(m["role"] == "assistant" for m in msgs):
            return "no_final_assistant", f"[{i}].messages[{len(msgs) - 1}]", "warning"
        return "no_final_assistant", f"[{i}].messages", "critical"
    # duplicate: the same messages as another record
    k = draw(st.integers(0, len(records) - 1).filter(lambda k: k != i))
    r["messages"] = copy.deepcopy(records[k]["messages"])
    return "duplicate_content", f"[{max(i, k)}]", "warning"


def _mutate_conversation(draw: st.DrawFn, records: list[dict[str, Any]], i: int) -> tuple[str, str, str]:
    c = records[i]
    pairs = c["training_pairs"]
    k = draw(st.integers(0, len(pairs) - 1))
    where = f"conversations[{i}].training_pairs[{k}]"
    kind = draw(
        st.sampled_from(
            [
                "del_target",
                "list_target",
                "null_query",
                "blank_target",
                "pair_not_object",
                "empty_pairs",
                "del_pairs",
                "duplicate_id",
            ]
        )
    )
    if kind == "del_target":
        del pairs[k]["target_response"]
        return "missing_required_field", f"{where}.target_response", "critical"
    if kind == "list_target":
        pairs[k]["target_response"] = ["a", "b"]
        return "invalid_data_type", f"{where}.target_response", "critical"
    if kind == "null_query":
        pairs[k]["user_query"] = None
        return "missing_required_field", f"{where}.user_query", "critical"
    if kind == "blank_target":
        pairs[k]["target_response"] = "   "
        return "empty_content", f"{where}.target_response", "critical"
    if kind == "pair_not_object":
        pairs[k] = "not a pair"
        return "invalid_data_type", where, "critical"
    if kind == "empty_pairs":
        c["training_pairs"] = []
        return "empty_array", f"conversations[{i}].training_pairs", "critical"
    if kind == "del_pairs":
        del c["training_pairs"]
        return "missing_required_field", f"conversations[{i}].training_pairs", "critical"
    other = draw(st.integers(0, len(records) - 1).filter(lambda o: o != i))
    c["conversation_id"] = records[other]["conversation_id"]
    return "duplicate_id", f"conversations[{max(i, other)}].conversation_id", "critical"


def _mutate_instruction(draw: st.DrawFn, records: list[dict[str, Any]], i: int) -> tuple[str, str, str]:
    r = records[i]
    kind = draw(st.sampled_from(["del_output", "int_output", "null_instruction", "empty_output", "dict_input"]))
    if kind == "del_output":
        del r["output"]
        return "missing_required_field", f"[{i}].output", "critical"
    if kind == "int_output":
        r["output"] = 1
        return "invalid_data_type", f"[{i}].output", "critical"
    if kind == "null_instruction":
        r["instruction"] = None
        return "missing_required_field", f"[{i}].instruction", "critical"
    if kind == "empty_output":
        r["output"] = ""
        return "empty_content", f"[{i}].output", "critical"
    r["input"] = {"nested": True}
    return "invalid_data_type", f"[{i}].input", "critical"


MUTATORS = {
    DatasetFormat.CHAT_JSONL: _mutate_chat,
    DatasetFormat.CONVERSATIONS: _mutate_conversation,
    DatasetFormat.INSTRUCTION_JSONL: _mutate_instruction,
}


@SETTINGS
@given(
    data=st.data(),
    fmt=st.sampled_from(list(DatasetFormat)),
    layout=st.sampled_from(LAYOUTS),
    block=BLOCKS,
)
def test_a_mutation_is_reported_at_its_path(
    workdir: Path, data: st.DataObject, fmt: DatasetFormat, layout: str, block: int | None
) -> None:
    records = data.draw(dataset(fmt, min_size=2))
    i = data.draw(st.integers(0, len(records) - 1))
    itype, path, severity = MUTATORS[fmt](data.draw, records, i)
    file = _write(workdir, _serialise(fmt, records, layout, ascii_only=True))
    with read_sizes(block):
        report = validate_file(file, format=fmt)
    found = [(x.type, x.path, x.severity) for x in report.issues]
    assert found == [(itype, path, severity)], found
    issue = report.issues[0]
    if layout == "jsonl":  # one record per line, no blank lines
        assert issue.line == int(path.split("[", 2)[1].split("]")[0]) + 1
    if severity == "critical":
        with pytest.raises(DatasetFormatError) as info:
            list(iter_examples(file, fmt))
        assert info.value.path == path
    else:
        assert len(list(iter_examples(file, fmt))) == report.stats.training_pairs
