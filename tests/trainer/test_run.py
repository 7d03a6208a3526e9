"""End to end: real trainer processes on a real tiny model.

The key property: a run interrupted at any step (SIGKILL at a random moment, or
SIGTERM) and resumed reports exactly the same per-step train losses as an
uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from brightrun_trainer.checkpoints import LATEST, verify_checkpoint
from brightrun_trainer.spec import EXIT_FAILED, EXIT_STOPPED, ReportTarget
from tests.trainer.trainer_harness import (
    CHAT_DATA,
    EXACT_PARAMS,
    TOKEN,
    Attempt,
    FlakyTrainerService,
    events,
    make_spec,
    read_reports,
    run_attempt,
    serve,
    start_attempt,
    train_losses,
)

STAGES = ["STAGE_PREPROCESSING", "STAGE_MODEL_LOADING", "STAGE_TRAINING", "STAGE_FINALIZATION"]


def _stderr(attempt: Attempt) -> str:
    return (attempt.spec.attempt_dir / "stderr.txt").read_text()[-4000:]


def _metric_step_at_least(step: int) -> Any:
    def match(report: dict[str, Any]) -> bool:
        metric = report.get("metric")
        return bool(metric) and "trainLoss" in metric and int(metric["step"]) >= step

    return match


def _assert_same_losses(reference: dict[int, float], attempts: list[Attempt]) -> set[int]:
    """Every train loss any attempt reported equals the reference's; returns the steps seen."""
    seen: set[int] = set()
    for attempt in attempts:
        for step, loss in train_losses(attempt.reports()).items():
            assert loss == reference[step], f"attempt {attempt.spec.attempt_number} step {step}"
            seen.add(step)
    return seen


def _resumed_step(attempt: Attempt) -> int | None:
    found = events(attempt.reports(), "RESUMED_FROM_CHECKPOINT")
    return int(found[0]["payload"]["step"]) if found else None


def test_full_run_reports_every_stage_and_stages_a_loadable_adapter(reference_run: Attempt, tiny_model: Path) -> None:
    reports = reference_run.reports()
    assert [int(r["sequence"]) for r in reports] == list(range(1, len(reports) + 1))

    stage_reports = [(r["stage"]["stage"], r["stage"]["status"]) for r in reports if "stage" in r]
    order = [s for s, status in stage_reports if status == "STATUS_RUNNING"]
    assert sorted(set(order), key=order.index) == STAGES
    assert [s for s, status in stage_reports if status == "STATUS_SUCCEEDED"] == STAGES
    messages = [r["stage"].get("message", "") for r in reports if "stage" in r]
    for expected in ("Tokenizing", "Creating train/validation split (80/20)", "Initializing LoRA adapters (rank=8)"):
        assert any(expected in m for m in messages), expected
    assert any("Saving LoRA adapters" in m for m in messages)
    assert any("Calculating final metrics" in m for m in messages)

    result = reports[-1]["result"]
    assert result["outcome"] == "OUTCOME_SUCCEEDED"
    assert result["adapterPath"] == "staging/adapter"
    assert int(result["lastStep"]) == 24
    assert math.isclose(result["finalPerplexity"], math.exp(result["finalEvalLoss"]))
    assert json.loads((reference_run.spec.attempt_dir / "result.json").read_text()) == result

    losses = train_losses(reports)
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(20, 25)) / 5
    assert last < first - 0.1, (first, last)  # the loss visibly falls

    metrics = [r["metric"] for r in reports if "metric" in r]
    step_metric = next(m for m in metrics if int(m["step"]) == 5)
    for key in ("learningRate", "gradNorm", "tokensPerSecond", "stepsPerSecond", "memoryUsedBytes", "memoryPeakBytes"):
        assert key in step_metric, key
    assert sorted(int(m["step"]) for m in metrics if "evalLoss" in m) == [4, 8, 12, 16, 20, 24]
    progress = [r["progress"] for r in reports if "progress" in r]
    assert [int(p["currentStep"]) for p in progress] == list(range(1, 25))
    assert {int(p["totalSteps"]) for p in progress} == {24}

    checkpoints = [r["checkpoint"] for r in reports if "checkpoint" in r]
    assert [int(c["step"]) for c in checkpoints] == [4, 8, 12, 16, 20, 24]
    saved = events(reports, "CHECKPOINT_SAVED")
    assert saved[0]["type"] == "TYPE_CHECKPOINT"
    assert set(saved[0]["payload"]) == {"step", "path", "size_bytes"}
    for code in ("DATASET_LOADED", "MODEL_LOADED", "EVALUATION"):
        assert events(reports, code), code
    # max_seq_length=96 cuts some replies short and some entirely.
    [truncated] = events(reports, "EXAMPLES_TRUNCATED")
    [dropped] = events(reports, "EXAMPLES_DROPPED")
    assert truncated["type"] == dropped["type"] == "TYPE_WARNING"
    assert set(dropped["payload"]["reasons"]) == {"truncated_away"}
    dataset = events(reports, "DATASET_LOADED")[0]["payload"]
    assert dataset["examples"] == 320
    assert dataset["trainable"] == 320 - dropped["payload"]["count"]
    assert dataset["truncated"] == truncated["payload"]["count"] > 0

    job_dir = reference_run.spec.job_dir
    kept = sorted(p.name for p in (job_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert kept == [LATEST, "step-00000016", "step-00000020", "step-00000024"]
    assert (job_dir / "checkpoints" / LATEST).read_text().strip() == "step-00000024"

    # No dataset text in the log.
    log_text = (reference_run.spec.attempt_dir / "trainer.log").read_text()
    first_example = json.loads(CHAT_DATA.read_text().splitlines()[0])
    for message in first_example["messages"]:
        assert message["content"] not in log_text

    # The staged adapter loads onto the base model and generates.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = job_dir / "staging" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert config["base_model_name_or_path"] == str(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b
    assert any(float(p.abs().sum()) > 0 for p in lora_b)  # trained, not the zero init
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi, I'm Alice. I forgot my password."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_sigkill_at_random_moments_then_resume_gives_identical_losses(
    reference_run: Attempt, tiny_model: Path, tmp_path: Path
) -> None:
    reference = train_losses(reference_run.reports())
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    job_dir = tmp_path / "job"
    attempts = []
    for number, kill_after in enumerate((5, 11, 16), start=1):
        attempt = start_attempt(make_spec(job_dir, tiny_model, attempt=number, **EXACT_PARAMS))
        attempts.append(attempt)
        attempt.wait_for(_metric_step_at_least(kill_after))
        time.sleep(rng.uniform(0.0, 0.08))  # somewhere in the next steps, maybe mid-checkpoint
        attempt.signal(signal.SIGKILL)
        assert attempt.wait() == -signal.SIGKILL, f"seed {seed}: the run ended before the kill"
    final = run_attempt(make_spec(job_dir, tiny_model, attempt=4, **EXACT_PARAMS))
    attempts.append(final)
    assert final.proc.returncode == 0, _stderr(final)

    resumed = [_resumed_step(a) for a in attempts]
    assert resumed[0] is None
    steps = [s for s in resumed[1:] if s is not None]
    assert len(steps) == 3, resumed
    assert steps == sorted(steps), resumed
    assert steps[0] > 0, resumed
    assert _assert_same_losses(reference, attempts) == set(range(1, 25)), f"seed {seed}"
    assert final.result()["finalTrainLoss"] == reference_run.result()["finalTrainLoss"]
    assert final.result()["finalEvalLoss"] == reference_run.result()["finalEvalLoss"]


def test_sigterm_checkpoints_the_current_step_and_loses_nothing(
    reference_run: Attempt, tiny_model: Path, tmp_path: Path
) -> None:
    reference = train_losses(reference_run.reports())
    job_dir = tmp_path / "job"
    first = start_attempt(make_spec(job_dir, tiny_model, **EXACT_PARAMS))
    first.wait_for(_metric_step_at_least(5))
    first.signal(signal.SIGTERM)
    assert first.wait() == EXIT_STOPPED, _stderr(first)

    reports = first.reports()
    stopped_at = max(train_losses(reports))
    result = first.result()
    assert result["outcome"] == "OUTCOME_STOPPED"
    assert int(result["lastStep"]) == stopped_at
    assert reports[-1]["result"] == result
    assert events(reports, "STOP_REQUESTED")[0]["payload"]["reason"] == "SIGTERM"
    checkpoint = job_dir / "checkpoints" / f"step-{stopped_at:08d}"
    assert verify_checkpoint(checkpoint).step == stopped_at
    assert (job_dir / "checkpoints" / LATEST).read_text().strip() == checkpoint.name
    assert int([r for r in reports if "checkpoint" in r][-1]["checkpoint"]["step"]) == stopped_at

    second = run_attempt(make_spec(job_dir, tiny_model, attempt=2, **EXACT_PARAMS))
    assert second.proc.returncode == 0, _stderr(second)
    assert _resumed_step(second) == stopped_at
    assert min(train_losses(second.reports())) == stopped_at + 1  # zero steps lost or redone
    assert _assert_same_losses(reference, [first, second]) == set(range(1, 25))


def test_corrupt_newest_checkpoints_are_skipped_for_an_older_one(
    reference_run: Attempt, tiny_model: Path, tmp_path: Path
) -> None:
    reference = train_losses(reference_run.reports())
    job_dir = tmp_path / "job"
    shutil.copytree(reference_run.spec.job_dir / "checkpoints", job_dir / "checkpoints")
    newest = job_dir / "checkpoints" / "step-00000024" / "trainer_state.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    second = job_dir / "checkpoints" / "step-00000020" / "adapter_model.safetensors"
    second.write_bytes(second.read_bytes()[:-7])

    attempt = run_attempt(make_spec(job_dir, tiny_model, attempt=2, **EXACT_PARAMS))
    assert attempt.proc.returncode == 0, _stderr(attempt)
    reports = attempt.reports()
    skipped = events(reports, "CHECKPOINT_SKIPPED")
    assert [e["type"] for e in skipped] == ["TYPE_WARNING", "TYPE_WARNING"]
    assert [e["payload"]["path"] for e in skipped] == ["checkpoints/step-00000024", "checkpoints/step-00000020"]
    assert "SHA-256" in skipped[0]["payload"]["reason"]
    assert "wrong size" in skipped[1]["payload"]["reason"]
    assert _resumed_step(attempt) == 16
    assert sorted(train_losses(reports)) == list(range(17, 25))
    assert _assert_same_losses(reference, [attempt]) == set(range(17, 25))


@pytest.mark.parametrize("mode", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantized_run_completes(tiny_model: Path, tmp_path: Path, mode: str) -> None:
    attempt = run_attempt(
        make_spec(
            tmp_path / "job",
            tiny_model,
            quantization=mode,
            max_steps=3,
            batch_size=2,
            max_seq_length=128,
            checkpoint_interval_steps=2,
            lora_rank=4,
            lora_alpha=8,
            # bitsandbytes quantizes nn.Linear only; the tiny model's hidden size is a multiple of 64.
            target_modules=["q_proj", "v_proj"],
        )
    )
    assert attempt.proc.returncode == 0, _stderr(attempt)
    reports = attempt.reports()
    loaded = events(reports, "MODEL_LOADED")[0]["payload"]
    assert loaded["quantization"] == mode
    if mode == "nf4":
        messages = [r["stage"].get("message", "") for r in reports if "stage" in r]
        assert "Applying 4-bit quantization (QLoRA)..." in messages
    assert sorted(train_losses(reports)) == [1, 2, 3]
    assert all(math.isfinite(v) for v in train_losses(reports).values())
    assert attempt.result()["outcome"] == "OUTCOME_SUCCEEDED"
    assert (tmp_path / "job" / "staging" / "adapter" / "adapter_model.safetensors").is_file()


SECRET = "my confidential prompt text that must stay private"


def _chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


@pytest.mark.parametrize(
    ("lines", "max_seq_length", "expected"),
    [
        ([_chat(("user", SECRET), ("assistant", "ok")), "{not json"], 512, "malformed JSON"),
        ([_chat(("user", SECRET))] * 3, 512, "assistant"),
        # Found only by the trainer: every target token is cut off by truncation.
        ([_chat(("user", SECRET + " and more words" * 4), ("assistant", "ok"))] * 3, 16, "no trainable example"),
    ],
    ids=["malformed-json", "no-assistant-turn", "all-targets-truncated"],
)
def test_dataset_errors_fail_before_any_training_step(
    tiny_model: Path, tmp_path: Path, lines: list[str], max_seq_length: int, expected: str
) -> None:
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text("\n".join(lines) + "\n")
    attempt = run_attempt(make_spec(tmp_path / "job", tiny_model, dataset=dataset, max_seq_length=max_seq_length))
    assert attempt.proc.returncode == EXIT_FAILED, _stderr(attempt)
    failure = attempt.result()["failure"]
    assert failure["exceptionType"] == "DatasetFormatError"
    assert failure["stage"] == "STAGE_PREPROCESSING"
    assert failure["failureClass"] == "FAILURE_CLASS_DATASET_FORMAT"
    assert expected in failure["message"]
    assert failure["logTail"]
    assert int(failure.get("step", 0)) == 0
    reports = attempt.reports()
    assert not [r for r in reports if "metric" in r or "checkpoint" in r]
    assert "STAGE_MODEL_LOADING" not in {r["stage"]["stage"] for r in reports if "stage" in r}
    assert not (tmp_path / "job" / "checkpoints").exists()
    everything = json.dumps(reports) + (attempt.spec.attempt_dir / "trainer.log").read_text()
    assert SECRET not in everything


def test_missing_base_model_fails_with_its_exception(tmp_path: Path) -> None:
    attempt = run_attempt(make_spec(tmp_path / "job", tmp_path / "no-such-model"))
    assert attempt.proc.returncode == EXIT_FAILED
    failure = attempt.result()["failure"]
    assert failure["exceptionType"] in {"OSError", "ValueError", "HFValidationError", "EnvironmentError"}
    assert failure["stage"] == "STAGE_PREPROCESSING"
    assert "failureClass" not in failure  # the server classifies
    assert failure["reason"].startswith(failure["exceptionType"])


def test_server_stop_directive_checkpoints_and_stops(tiny_model: Path, tmp_path: Path) -> None:
    def at_step_3(report: Any) -> bool:
        return report.WhichOneof("report") == "metric" and report.metric.step >= 3

    # No chaos here (test_report covers it): backoff could delay the directive past the last step.
    service = FlakyTrainerService(stop_when=at_step_3)
    server, port = serve(service)
    try:
        target = ReportTarget(address=f"127.0.0.1:{port}", token=TOKEN)
        attempt = run_attempt(make_spec(tmp_path / "job", tiny_model, report=target, **EXACT_PARAMS))
    finally:
        server.stop(None)
    assert attempt.proc.returncode == EXIT_STOPPED, _stderr(attempt)
    outbox = read_reports(attempt.outbox)
    # Everything reached the server exactly once and in order, the result included.
    assert [r.sequence for r in service.stored] == [int(r["sequence"]) for r in outbox]
    assert service.stored[-1].result.outcome == 3  # OUTCOME_STOPPED
    assert events(outbox, "STOP_REQUESTED")[0]["payload"]["reason"] == "server directive"
    stopped_at = int(outbox[-1]["result"]["lastStep"])
    assert 3 <= stopped_at < 24
    assert verify_checkpoint(tmp_path / "job" / "checkpoints" / f"step-{stopped_at:08d}").step == stopped_at


def test_sigterm_before_training_stops_promptly_without_a_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    attempt = start_attempt(make_spec(tmp_path / "job", tiny_model, **EXACT_PARAMS))
    attempt.wait_for(lambda r: "stage" in r)  # the first stage report: preprocessing has begun
    attempt.signal(signal.SIGTERM)
    assert attempt.wait(timeout=60) == EXIT_STOPPED, _stderr(attempt)
    reports = attempt.reports()
    assert reports[-1]["result"]["outcome"] == "OUTCOME_STOPPED"
    assert int(reports[-1]["result"].get("lastStep", 0)) == 0
    assert "STAGE_TRAINING" not in {r["stage"]["stage"] for r in reports if "stage" in r}
    assert not [r for r in reports if "metric" in r]
    assert not (tmp_path / "job" / "checkpoints").exists()


def test_gradient_checkpointing_and_debug_log_data(tiny_model: Path, tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path / "job",
        tiny_model,
        gradient_checkpointing=True,
        max_steps=3,
        batch_size=2,
        max_seq_length=128,
        lr_scheduler="constant",
    ).model_copy(update={"debug_log_data": True})
    attempt = run_attempt(spec)
    assert attempt.proc.returncode == 0, _stderr(attempt)
    reports = attempt.reports()
    messages = [r["stage"].get("message", "") for r in reports if "stage" in r]
    assert "Enabling gradient checkpointing..." in messages
    assert sorted(train_losses(reports)) == [1, 2, 3]
    learning_rates = [r["metric"]["learningRate"] for r in reports if "metric" in r and "learningRate" in r["metric"]]
    assert learning_rates[-2:] == [2e-4, 2e-4]  # constant after warmup
    log_text = (spec.attempt_dir / "trainer.log").read_text()
    assert "targets in [[ ]]" in log_text
    assert "[[" in log_text.split("targets in [[ ]]", 1)[1]


GOLDEN = Path(__file__).parent / "golden_losses.json"


def test_loss_trajectory_matches_the_golden_file(reference_run: Attempt) -> None:
    """Catches silent changes to data handling, masking, loss or optimisation.

    Regenerate after an intended change with BRIGHTRUN_UPDATE_GOLDEN=1.
    """
    losses = {str(step): loss for step, loss in sorted(train_losses(reference_run.reports()).items())}
    if os.environ.get("BRIGHTRUN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"params": EXACT_PARAMS, "train_losses": losses}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["params"] == EXACT_PARAMS, "the golden file belongs to other parameters; regenerate it"
    assert losses.keys() == golden["train_losses"].keys()
    for step, loss in golden["train_losses"].items():
        assert math.isclose(losses[step], loss, rel_tol=1e-4), f"step {step}: {losses[step]} != golden {loss}"


def test_failure_during_training_reports_stage_step_and_log_tail(tiny_model: Path, tmp_path: Path) -> None:
    # A model whose embedding of one token is NaN: the loss diverges at the first
    # step whose batch holds that token, after some good steps (the order is seeded).
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    # " now" is in 2 training examples and no validation one; the seeded order first
    # reaches one at step 17.
    [token] = AutoTokenizer.from_pretrained(broken).encode(" now", add_special_tokens=False)
    weights = load_file(broken / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})

    attempt = run_attempt(make_spec(tmp_path / "job", broken, **EXACT_PARAMS))
    assert attempt.proc.returncode == EXIT_FAILED, _stderr(attempt)
    failure = attempt.result()["failure"]
    assert failure["exceptionType"] == "LossDivergenceError"
    assert failure["stage"] == "STAGE_TRAINING"
    last_step = max(train_losses(attempt.reports()))
    assert 1 <= last_step < 24
    assert int(failure["step"]) == last_step
    assert f"at step {last_step + 1}" in failure["message"]
    assert any("LossDivergenceError" in line for line in failure["logTail"])
    assert events(attempt.reports(), "TRAINING_FAILED")[0]["type"] == "TYPE_ERROR"


def test_resume_from_an_older_checkpoint_moves_newer_ones_aside(
    reference_run: Attempt, tiny_model: Path, tmp_path: Path
) -> None:
    reference = train_losses(reference_run.reports())
    job_dir = tmp_path / "job"
    shutil.copytree(reference_run.spec.job_dir / "checkpoints", job_dir / "checkpoints")
    spec = make_spec(job_dir, tiny_model, attempt=2, **EXACT_PARAMS).model_copy(
        update={"resume_from": Path("checkpoints/step-00000016")}
    )
    attempt = run_attempt(spec)
    assert attempt.proc.returncode == 0, _stderr(attempt)
    assert _resumed_step(attempt) == 16
    assert _assert_same_losses(reference, [attempt]) == set(range(17, 25))
    names = sorted(p.name for p in (job_dir / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("step-")] == ["step-00000016", "step-00000020", "step-00000024"]
    assert len([n for n in names if n.startswith(".superseded-")]) == 2  # the old 20 and 24, kept aside
    assert verify_checkpoint(job_dir / "checkpoints" / "step-00000024").step == 24


def test_continuation_with_another_batch_size_and_a_restarted_schedule(
    reference_run: Attempt, tiny_model: Path, tmp_path: Path
) -> None:
    source = reference_run.spec.job_dir / "checkpoints" / "step-00000016"
    params = {**EXACT_PARAMS, "batch_size": 2, "max_steps": 0}
    spec = make_spec(tmp_path / "continuation", tiny_model, **params).model_copy(
        update={"resume_from": source, "lr_schedule_mode": "restart_warmup"}
    )
    attempt = run_attempt(spec)
    assert attempt.proc.returncode == 0, _stderr(attempt)
    reports = attempt.reports()
    assert _resumed_step(attempt) == 16
    # 16 steps of 8 examples = 128 consumed; at 4 examples a step that is step 32 of
    # ceil(ceil(228 / 2) / 2) = 57 in epoch 0, so 25 steps remain.
    [changed] = events(reports, "PLAN_CHANGED")
    assert changed["type"] == "TYPE_WARNING"
    assert (changed["payload"]["epoch"], changed["payload"]["step_in_epoch"]) == (0, 32)
    assert int(changed["payload"]["total_steps"]) == 41
    [restarted] = events(reports, "SCHEDULE_RESTARTED")
    assert (restarted["payload"]["warmup_steps"], restarted["payload"]["steps"]) == (3, 25)
    metrics = [r["metric"] for r in reports if "metric" in r and "trainLoss" in r["metric"]]
    assert [int(m["step"]) for m in metrics] == list(range(17, 42))
    assert metrics[0]["epoch"] == pytest.approx(33 / 57)
    assert metrics[0].get("learningRate", 0.0) == 0.0  # warmup starts again from zero
    assert max(m["learningRate"] for m in metrics) == pytest.approx(EXACT_PARAMS["learning_rate"], rel=1e-6)
    assert {int(r["progress"]["totalSteps"]) for r in reports if "progress" in r} == {41}
    assert attempt.result()["outcome"] == "OUTCOME_SUCCEEDED"
    # The source job's checkpoints are untouched; the continuation writes its own.
    assert verify_checkpoint(source).step == 16
    assert (tmp_path / "continuation" / "checkpoints" / "step-00000041").is_dir()
