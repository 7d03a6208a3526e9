"""User actions on failures, over the wire with a scripted trainer: pause and
resume, stalls, suggested fixes and retries, failure reports, continuations."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from brightrun.v1 import job_pb2
from brightrun.v1 import job_service_pb2 as js
from brightrun.v1 import trainer_service_pb2 as ts
from brightrun_trainer.checkpoints import CheckpointStore
from tests.conftest import ServerHandle, start_server, stop_server
from tests.server.conftest import (
    TERMINAL,
    ScriptedAttempt,
    Stubs,
    attach,
    details,
    stage_adapter,
    start_scripted_job,
    stubs_for,
)

S = job_pb2.Stage
RUNNING = job_pb2.JobStage.STATUS_RUNNING


def to_training(attempt: ScriptedAttempt) -> None:
    for stage in (S.STAGE_PREPROCESSING, S.STAGE_MODEL_LOADING, S.STAGE_TRAINING):
        attempt.stage(stage)


def checkpoint(attempt: ScriptedAttempt, step: int) -> Path:
    """Write a real checkpoint with the trainer's own store, and report it."""
    store = CheckpointStore(attempt.attempt_dir.parent.parent / "checkpoints")

    def payload(tmp: Path) -> None:
        (tmp / "adapter_model.safetensors").write_bytes(b"w" * 64)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))

    saved = store.save(step, payload, {"epoch": step / 100})
    report = ts.CheckpointReport(
        step=step,
        epoch=step / 100,
        path=str(saved.path.relative_to(attempt.attempt_dir.parent.parent)),
        size_bytes=saved.size_bytes,
        manifest_sha256=saved.manifest_sha256,
    )
    attempt.send([attempt.next(checkpoint=report)])
    return saved.path


def fail(attempt: ScriptedAttempt, exception_type: str, message: str, step: int) -> None:
    failure = job_pb2.JobFailure(exception_type=exception_type, message=message, stage=S.STAGE_TRAINING, step=step)
    result = ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_FAILED, failure=failure)
    attempt.send([attempt.next(result=result)])
    attempt.kill(signal.SIGKILL)


def oom_job(stubs: Stubs, **overrides: int) -> tuple[ScriptedAttempt, job_pb2.Job]:
    attempt = start_scripted_job(stubs, overrides=job_pb2.TrainingConfig(**overrides) if overrides else None)
    to_training(attempt)
    attempt.metrics(range(1, 4))
    checkpoint(attempt, 2)
    fail(attempt, "OutOfMemoryError", "CUDA out of memory. Tried to allocate 1.50 GiB", 3)
    return attempt, stubs.wait_state(attempt.job_id, TERMINAL)


# ---------------------------------------------------------------- pause / resume


def test_pause_checkpoints_stops_billing_and_resume_continues_elsewhere(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    to_training(attempt)
    attempt.metrics(range(1, 6))
    pausing = stubs.jobs.PauseJob(js.PauseJobRequest(job_id=attempt.job_id))
    assert pausing.state == job_pb2.Job.STATE_PAUSING
    assert attempt.send([]).directive == ts.DIRECTIVE_STOP
    checkpoint(attempt, 5)
    attempt.send([attempt.next(result=ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_STOPPED, last_step=5))])
    paused = stubs.wait_state(attempt.job_id, {job_pb2.Job.STATE_PAUSED})
    assert "step 5" in paused.state_message
    attempt.kill(signal.SIGKILL)  # a trainer exits once it has reported; the worker's billing ends with it
    time.sleep(0.5)
    billed = stubs.get_job(attempt.job_id).cost.billed_seconds
    time.sleep(0.5)
    assert stubs.get_job(attempt.job_id).cost.billed_seconds == billed, "a paused job costs nothing"
    resumed = stubs.jobs.ResumeJob(
        js.ResumeJobRequest(
            job_id=attempt.job_id,
            compute=job_pb2.ComputeConfig(gpu_type="a100-80gb", pricing_tier=job_pb2.PRICING_TIER_ON_DEMAND),
        )
    )
    assert resumed.state in (job_pb2.Job.STATE_QUEUED, job_pb2.Job.STATE_PROVISIONING)
    assert resumed.compute.gpu_type == "A100-80GB"
    assert resumed.compute.pricing_tier == job_pb2.PRICING_TIER_ON_DEMAND
    assert resumed.paused_duration.ToTimedelta().total_seconds() >= 1.0
    second = attach(stubs, attempt.job_id, attempt=2)
    second.kill(signal.SIGKILL)


def test_only_training_jobs_pause_and_only_paused_jobs_resume(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.PauseJob(js.PauseJobRequest(job_id=attempt.job_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = details(caught.value)
    assert (info.reason, info.metadata["allowed_states"]) == ("JOB_STATE_CONFLICT", "training")
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.ResumeJob(js.ResumeJobRequest(job_id=attempt.job_id))
    assert details(caught.value)[0].metadata["allowed_states"] == "paused"
    attempt.kill(signal.SIGKILL)


def test_cancel_a_paused_job(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    to_training(attempt)
    stubs.jobs.PauseJob(js.PauseJobRequest(job_id=attempt.job_id))
    checkpoint(attempt, 1)
    attempt.send([attempt.next(result=ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_STOPPED))])
    stubs.wait_state(attempt.job_id, {job_pb2.Job.STATE_PAUSED})
    job = stubs.jobs.CancelJob(js.CancelJobRequest(job_id=attempt.job_id, reason=job_pb2.CANCEL_REASON_TESTING))
    assert job.state == job_pb2.Job.STATE_CANCELLED


# ---------------------------------------------------------------- stalls


@pytest.fixture
def stall_server(tmp_path: Path, sleeper: Path) -> Iterator[tuple[ServerHandle, Stubs]]:
    handle = start_server(tmp_path, trainer_python=str(sleeper), stop_grace_seconds=1.0, stall_seconds=1.5)
    s = stubs_for(handle)
    yield handle, s
    s.channel.close()
    stop_server(handle)


def test_a_stalled_trainer_is_stopped_and_recovered(stall_server: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = stall_server
    attempt = start_scripted_job(stubs)
    to_training(attempt)
    attempt.metrics(range(1, 3))
    # No more steps: after stall_seconds the server stops the worker and recovers.
    job = stubs.wait_state(attempt.job_id, {job_pb2.Job.STATE_RECOVERING, job_pb2.Job.STATE_PROVISIONING}, timeout=20)
    assert job.interruptions[0].failure_class == job_pb2.FAILURE_CLASS_STALL
    codes = [e.code for e in stubs.jobs.ListJobEvents(js.ListJobEventsRequest(job_id=job.id, page_size=1000)).events]
    assert "STALL" in codes
    attach(stubs, job.id, attempt=2).kill(signal.SIGKILL)


# ---------------------------------------------------------------- fixes and retries


def test_oom_fixes_are_ranked_with_effects_and_a_retry_applies_them(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    _, failed = oom_job(stubs, batch_size=8, max_seq_length=2048)
    assert failed.failure.failure_class == job_pb2.FAILURE_CLASS_OUT_OF_MEMORY
    assert failed.attempt_count == 1, "out of memory is never retried automatically"
    suggested = stubs.jobs.SuggestFixes(js.SuggestFixesRequest(job_id=failed.id))
    assert suggested.failure_class == job_pb2.FAILURE_CLASS_OUT_OF_MEMORY
    ids = [f.id for f in suggested.fixes]
    assert ids[0] == "reduce_batch_size"
    for expected in ("conservative_preset", "shorter_max_length", "gradient_checkpointing", "quantize_4bit"):
        assert expected in ids
    top = suggested.fixes[0]
    assert (top.config_changes.batch_size, top.config_changes.gradient_accumulation_steps) == (4, 2)
    assert top.confidence.experimental
    assert top.confidence.outcomes == 0
    assert "conservative_preset" not in top.incompatible_with
    by_id = {f.id: f for f in suggested.fixes}
    assert "shorter_max_length" not in by_id["reduce_batch_size"].incompatible_with

    retry = stubs.jobs.RetryJob(js.RetryJobRequest(job_id=failed.id, fix_ids=["reduce_batch_size"]))
    assert retry.name == f"{failed.name} (Retry #1)"
    assert (retry.config.batch_size, retry.config.gradient_accumulation_steps) == (4, 2)
    assert retry.config.max_seq_length == 2048
    assert retry.lineage.retry_of == failed.id
    assert retry.lineage.retry_number == 1
    assert retry.lineage.root_job_id == failed.id
    assert list(retry.lineage.applied_fixes) == ["reduce_batch_size"]

    # The retry completes: the fix's confidence now counts it.
    second = attach(stubs, retry.id)
    to_training(second)
    second.metrics(range(1, 3))
    path = stage_adapter(second)
    second.send([second.next(result=ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_SUCCEEDED, adapter_path=path))])
    done = stubs.wait_state(retry.id, TERMINAL)
    assert done.state == job_pb2.Job.STATE_COMPLETED
    assert done.lineage.chain_spend_usd >= done.cost.spend_usd
    second.kill(signal.SIGKILL)
    _, other = oom_job(stubs, batch_size=8)
    again = {f.id: f for f in stubs.jobs.SuggestFixes(js.SuggestFixesRequest(job_id=other.id)).fixes}
    assert (again["reduce_batch_size"].confidence.outcomes, again["reduce_batch_size"].confidence.success_rate) == (
        1,
        1.0,
    )


def test_fix_combinations_are_checked(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    _, failed = oom_job(stubs, batch_size=8, lora_rank=32)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.RetryJob(js.RetryJobRequest(job_id=failed.id, fix_ids=["no_such_fix"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown fix 'no_such_fix'" in details(caught.value)[1][0][1]
    combined = stubs.jobs.RetryJob(
        js.RetryJobRequest(job_id=failed.id, fix_ids=["reduce_batch_size", "quantize_4bit", "gradient_checkpointing"])
    )
    assert combined.config.batch_size == 4
    assert combined.config.quantization == job_pb2.QUANTIZATION_NF4
    assert combined.config.gradient_checkpointing
    stubs.jobs.CancelJob(js.CancelJobRequest(job_id=combined.id, reason=job_pb2.CANCEL_REASON_TESTING))


def test_at_most_five_retries_per_original_job(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    job = stubs.jobs.CancelJob(js.CancelJobRequest(job_id=attempt.job_id, reason=job_pb2.CANCEL_REASON_TESTING))
    job = stubs.wait_state(job.id, TERMINAL)
    source = job
    for n in range(1, 6):
        retry = stubs.jobs.RetryJob(js.RetryJobRequest(job_id=source.id))
        assert retry.lineage.retry_number == n
        assert retry.lineage.root_job_id == job.id
        assert retry.name == f"{job.name} (Retry #{n})"
        source = stubs.jobs.CancelJob(js.CancelJobRequest(job_id=retry.id, reason=job_pb2.CANCEL_REASON_TESTING))
        source = stubs.wait_state(source.id, TERMINAL)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.RetryJob(js.RetryJobRequest(job_id=source.id))
    info, _ = details(caught.value)
    assert (info.reason, info.metadata["retries"]) == ("RETRY_LIMIT_REACHED", "5")


def test_a_replayed_retry_returns_the_job_it_created_even_at_the_limit(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    stubs.jobs.CancelJob(js.CancelJobRequest(job_id=attempt.job_id, reason=job_pb2.CANCEL_REASON_TESTING))
    source = stubs.wait_state(attempt.job_id, TERMINAL)
    requests = [js.RetryJobRequest(job_id=source.id, request_id=f"retry-{n}", force=True) for n in range(1, 6)]
    retries = [stubs.jobs.RetryJob(r) for r in requests]
    assert [r.lineage.retry_number for r in retries] == [1, 2, 3, 4, 5]

    # The client lost the answers and asks again: the same jobs, numbered as they were.
    for request, retry in zip(requests, retries, strict=True):
        again = stubs.jobs.RetryJob(request)
        assert (again.id, again.name, again.lineage.retry_number) == (retry.id, retry.name, retry.lineage.retry_number)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.RetryJob(js.RetryJobRequest(job_id=source.id, request_id="retry-6", force=True))
    assert details(caught.value)[0].reason == "RETRY_LIMIT_REACHED"

    # A request id reused for another request (here: without force) is still refused.
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.RetryJob(js.RetryJobRequest(job_id=source.id, request_id="retry-1"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, _ = details(caught.value)
    assert (info.reason, info.metadata["job_id"]) == ("REQUEST_ID_REUSED", retries[0].id)
    for retry in retries:
        stubs.jobs.CancelJob(js.CancelJobRequest(job_id=retry.id, reason=job_pb2.CANCEL_REASON_TESTING))


def test_force_lets_a_retry_or_continuation_past_the_double_start_guard(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    _, failed = oom_job(stubs, batch_size=8)
    first = stubs.jobs.RetryJob(js.RetryJobRequest(job_id=failed.id))
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.RetryJob(js.RetryJobRequest(job_id=failed.id))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info, _ = details(caught.value)
    assert (info.reason, info.metadata["job_id"]) == ("DUPLICATE_JOB", first.id)
    forced = stubs.jobs.RetryJob(js.RetryJobRequest(job_id=failed.id, force=True))
    assert forced.id != first.id
    assert forced.config_fingerprint == first.config_fingerprint
    assert forced.lineage.retry_number == 2

    changes = job_pb2.TrainingConfig(batch_size=4)
    continuation = stubs.jobs.ResumeFromCheckpoint(js.ResumeFromCheckpointRequest(job_id=failed.id, changes=changes))
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.ResumeFromCheckpoint(js.ResumeFromCheckpointRequest(job_id=failed.id, changes=changes))
    info, _ = details(caught.value)
    assert (info.reason, info.metadata["job_id"]) == ("DUPLICATE_JOB", continuation.id)
    request = js.ResumeFromCheckpointRequest(job_id=failed.id, changes=changes, request_id="again", force=True)
    second = stubs.jobs.ResumeFromCheckpoint(request)
    assert second.id != continuation.id
    assert second.lineage.resumed_from_job_id == failed.id
    assert stubs.jobs.ResumeFromCheckpoint(request).id == second.id, "a replay returns the continuation it made"
    for job in (first, forced, continuation, second):
        stubs.jobs.CancelJob(js.CancelJobRequest(job_id=job.id, reason=job_pb2.CANCEL_REASON_TESTING))


def test_dataset_errors_point_at_the_validator_and_cannot_be_retried_blindly(
    scripted: tuple[ServerHandle, Stubs],
) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    attempt.stage(S.STAGE_PREPROCESSING)
    failure = job_pb2.JobFailure(
        exception_type="DatasetFormatError",
        message="conversations[3].messages[1]: every target token is truncated at max_seq_length 512",
        stage=S.STAGE_PREPROCESSING,
    )
    attempt.send([attempt.next(result=ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_FAILED, failure=failure))])
    attempt.kill(signal.SIGKILL)
    failed = stubs.wait_state(attempt.job_id, TERMINAL)
    assert failed.failure.failure_class == job_pb2.FAILURE_CLASS_DATASET_FORMAT
    assert failed.attempt_count == 1
    fixes = stubs.jobs.SuggestFixes(js.SuggestFixesRequest(job_id=failed.id)).fixes
    assert [f.id for f in fixes] == ["fix_dataset"]
    assert "conversations[3].messages[1]" in fixes[0].description
    assert "brightrun datasets validate" in fixes[0].description
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.RetryJob(js.RetryJobRequest(job_id=failed.id, fix_ids=["fix_dataset"]))
    assert details(caught.value)[0].reason == "FIX_NOT_APPLICABLE"
    report = stubs.jobs.GetFailureReport(js.GetFailureReportRequest(job_id=failed.id))
    assert [a.kind for a in report.actions] == ["fix_dataset"]


# ---------------------------------------------------------------- failure report


def test_failure_report_has_the_audit_trail(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    _, failed = oom_job(stubs)
    report = stubs.jobs.GetFailureReport(js.GetFailureReportRequest(job_id=failed.id))
    assert report.job_id == failed.id
    assert report.failure.failure_class == job_pb2.FAILURE_CLASS_OUT_OF_MEMORY
    assert report.failure.origin == job_pb2.FAILURE_ORIGIN_USER
    assert report.failure.evidence
    assert report.base_model == "scripted/model"
    assert report.last_completed_step == 3
    assert [c.step for c in report.checkpoints] == [2]
    assert "attempts/1/spec.json" in report.files_written
    assert any(f.startswith("checkpoints/step-") for f in report.files_written)
    assert report.partial_outputs.metric_points == 3
    assert report.partial_outputs.checkpoints == 1
    assert report.partial_outputs.last_train_loss == pytest.approx(2.0 / 4)
    assert report.actual.attempts == 1
    assert report.actual.spend_usd > 0
    kinds = [a.kind for a in report.actions]
    assert kinds[0] == "retry_with_fix"
    assert "resume_from_checkpoint" in kinds
    assert {a.rpc for a in report.actions} >= {"RetryJob", "ResumeFromCheckpoint"}
    running = start_scripted_job(stubs)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.GetFailureReport(js.GetFailureReportRequest(job_id=running.job_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    running.kill(signal.SIGKILL)


# ---------------------------------------------------------------- continuation


def test_resume_from_checkpoint_creates_a_linked_continuation(scripted: tuple[ServerHandle, Stubs]) -> None:
    handle, stubs = scripted
    _, failed = oom_job(stubs, batch_size=8)
    checkpoints = stubs.jobs.ListJobCheckpoints(js.ListJobCheckpointsRequest(job_id=failed.id)).checkpoints
    assert [c.step for c in checkpoints] == [2]

    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.ResumeFromCheckpoint(
            js.ResumeFromCheckpointRequest(job_id=failed.id, changes=job_pb2.TrainingConfig(lora_rank=8, epochs=9))
        )
    fields = dict(details(caught.value)[1])
    assert "locked on resume" in fields["changes.lora_rank"]
    assert "must not exceed the original 3 epochs" in fields["changes.epochs"]

    continuation = stubs.jobs.ResumeFromCheckpoint(
        js.ResumeFromCheckpointRequest(
            job_id=failed.id,
            changes=job_pb2.TrainingConfig(batch_size=4, gradient_accumulation_steps=2),
            lr_schedule=job_pb2.LR_SCHEDULE_MODE_RESTART_WARMUP,
        )
    )
    assert continuation.lineage.resumed_from_job_id == failed.id
    assert continuation.lineage.resumed_from_checkpoint_id == checkpoints[0].id
    assert continuation.config.batch_size == 4
    assert continuation.config.lora_rank == failed.config.lora_rank
    spec_path = handle.data_dir / "jobs" / continuation.id / "attempts" / "1" / "spec.json"
    deadline = time.monotonic() + 30
    while not spec_path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    spec = json.loads(spec_path.read_text())
    assert spec["resume_from"].endswith("checkpoints/step-00000002")
    assert spec["lr_schedule_mode"] == "restart_warmup"
    attach(stubs, continuation.id).kill(signal.SIGKILL)


def test_a_corrupt_checkpoint_is_refused_and_skipped(scripted: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    to_training(attempt)
    older = checkpoint(attempt, 1)
    newer = checkpoint(attempt, 2)
    (newer / "adapter_model.safetensors").write_bytes(b"x" * 64)  # flip the weights
    fail(attempt, "OutOfMemoryError", "CUDA out of memory", 2)
    failed = stubs.wait_state(attempt.job_id, TERMINAL)
    newest = stubs.jobs.ListJobCheckpoints(js.ListJobCheckpointsRequest(job_id=failed.id)).checkpoints[0]
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.ResumeFromCheckpoint(js.ResumeFromCheckpointRequest(job_id=failed.id, checkpoint_id=newest.id))
    assert details(caught.value)[0].reason == "CHECKPOINT_CORRUPT"
    continuation = stubs.jobs.ResumeFromCheckpoint(js.ResumeFromCheckpointRequest(job_id=failed.id))
    assert continuation.lineage.resumed_from_checkpoint_id != newest.id, "the newest one fails; the older one is used"
    assert older.exists()
    attach(stubs, continuation.id).kill(signal.SIGKILL)
