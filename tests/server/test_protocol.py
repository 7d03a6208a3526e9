"""The trainer report protocol and what it drives: exactly-once storage, the state
machine, publication, failure classification, cancellation, streams."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, json_format

from brightrun.v1 import job_pb2, job_service_pb2, trainer_service_pb2
from brightrun.v1 import job_service_pb2 as js
from brightrun.v1 import trainer_service_pb2 as ts
from tests.conftest import start_server, stop_server
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
SUCCEEDED = job_pb2.JobStage.STATUS_SUCCEEDED


def metric_seqs(stubs: Stubs, job_id: str) -> list[int]:
    page = stubs.jobs.ListJobMetrics(job_service_pb2.ListJobMetricsRequest(job_id=job_id, page_size=10000))
    return [m.sequence for m in page.metrics]


def run_to_training(attempt: ScriptedAttempt) -> None:
    attempt.stage(S.STAGE_PREPROCESSING, message="Parsing 320 conversations...")
    attempt.stage(S.STAGE_MODEL_LOADING)
    attempt.stage(S.STAGE_TRAINING)


def succeed(attempt: ScriptedAttempt, *, step: int) -> trainer_service_pb2.ReportAttemptResponse:
    path = stage_adapter(attempt)
    attempt.stage(S.STAGE_FINALIZATION, message="Saving LoRA adapters...")
    result = ts.AttemptResult(
        outcome=ts.AttemptResult.OUTCOME_SUCCEEDED,
        adapter_path=path,
        final_eval_loss=0.42,
        final_perplexity=1.52,
        last_step=step,
    )
    return attempt.send([attempt.next(result=result)])


def test_reports_are_stored_exactly_once_in_order(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    batch = [attempt.next(metric=job_pb2.MetricPoint(step=s, train_loss=1.0 / s)) for s in range(1, 11)]
    first = attempt.send(batch)
    again = attempt.send(batch)  # a redelivery after a lost response
    assert first.acknowledged_sequence == again.acknowledged_sequence == attempt.seq
    assert metric_seqs(stubs, attempt.job_id) == list(range(1, 11))

    # A gap: the server stores nothing past it and acknowledges the last contiguous report.
    later = [attempt.next(metric=job_pb2.MetricPoint(step=s, train_loss=0.1)) for s in range(11, 14)]
    response = attempt.send(later[1:])
    assert response.acknowledged_sequence == later[0].sequence - 1
    assert metric_seqs(stubs, attempt.job_id) == list(range(1, 11))
    # Resending from the acknowledged sequence fills the gap; overlap is skipped.
    response = attempt.send(later)
    assert response.acknowledged_sequence == later[-1].sequence
    assert metric_seqs(stubs, attempt.job_id) == list(range(1, 14))
    job = stubs.get_job(attempt.job_id)
    assert job.last_metric_sequence == 13
    assert job.latest_metrics.step == 13


def test_bad_tokens_are_refused(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    with pytest.raises(grpc.RpcError) as caught:
        attempt.send([attempt.next(metric=job_pb2.MetricPoint(step=1))], token="forged")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info, _ = details(caught.value)
    assert info.reason == "ATTEMPT_TOKEN_INVALID"
    assert info.metadata["attempt_id"] == attempt.attempt_id
    assert metric_seqs(stubs, attempt.job_id) == []


def test_stages_drive_the_state_machine_and_success_publishes_atomically(scripted: tuple[object, Stubs]) -> None:
    handle, stubs = scripted
    attempt = start_scripted_job(stubs)
    seen = []
    for stage, state in [
        (S.STAGE_PREPROCESSING, job_pb2.Job.STATE_PREPROCESSING),
        (S.STAGE_MODEL_LOADING, job_pb2.Job.STATE_MODEL_LOADING),
        (S.STAGE_TRAINING, job_pb2.Job.STATE_TRAINING),
    ]:
        attempt.stage(stage, message=f"working on {S.Name(stage)}")
        job = stubs.get_job(attempt.job_id)
        assert job.state == state
        seen.append(job.stages[stage - 1].message)
    attempt.metrics(range(1, 6))
    attempt.send([attempt.next(progress=ts.ProgressReport(current_step=5, total_steps=10, epoch=0.5, total_epochs=1))])
    job = stubs.get_job(attempt.job_id)
    assert (job.progress.current_step, job.progress.total_steps, job.progress.fraction) == (5, 10, 0.5)
    assert [s.status for s in job.stages[:3]] == [SUCCEEDED, SUCCEEDED, SUCCEEDED]
    assert job.stages[3].status == RUNNING

    staged_dir = attempt.attempt_dir.parent.parent / "staging" / "adapter"
    succeed(attempt, step=10)
    job = stubs.get_job(attempt.job_id)
    assert job.state == job_pb2.Job.STATE_COMPLETED
    assert job.output.final_eval_loss == pytest.approx(0.42)
    published = Path(job.output.adapter_path)
    assert published.is_dir()
    assert (published / "adapter_config.json").exists()
    assert not staged_dir.exists(), "publication moves the staged adapter"
    assert published.parent == handle.data_dir / "artifacts"  # type: ignore[attr-defined]
    assert all(s.status == SUCCEEDED for s in job.stages)
    assert all(s.HasField("duration") for s in job.stages)
    # The worker is still alive until it exits; its token stops working once it does.
    attempt.kill(signal.SIGKILL)
    deadline = time.monotonic() + 10
    with pytest.raises(grpc.RpcError) as expired:  # noqa: PT012 - polls until the exit is seen
        while time.monotonic() < deadline:
            attempt.send([])
            time.sleep(0.05)
    assert expired.value.code() == grpc.StatusCode.UNAUTHENTICATED
    final = stubs.get_job(attempt.job_id)
    assert final.state == job_pb2.Job.STATE_COMPLETED
    assert final.cost.billed_seconds > 0
    assert final.cost.spend_usd == pytest.approx(final.cost.billed_seconds / 3600 * 2.49)


def test_out_of_order_stage_is_a_warning_not_a_crash(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    attempt.stage(S.STAGE_TRAINING)  # skipped preprocessing and model loading
    job = stubs.get_job(attempt.job_id)
    assert job.state == job_pb2.Job.STATE_PROVISIONING
    events = stubs.jobs.ListJobEvents(js.ListJobEventsRequest(job_id=attempt.job_id, query="STAGE_OUT_OF_ORDER"))
    assert len(events.events) == 1


@pytest.mark.parametrize(
    ("exception_type", "message", "expected"),
    [
        ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB", job_pb2.FAILURE_CLASS_OUT_OF_MEMORY),
        (
            "RuntimeError",
            "[enforce fail at alloc_cpu.cpp:116] DefaultCPUAllocator: can't allocate memory",
            job_pb2.FAILURE_CLASS_OUT_OF_MEMORY,
        ),
        ("OSError", "[Errno 28] No space left on device", job_pb2.FAILURE_CLASS_DISK_FULL),
        ("DatasetFormatError", "line 3: missing required field 'messages'", job_pb2.FAILURE_CLASS_DATASET_FORMAT),
        ("ConnectionResetError", "Connection reset by peer", job_pb2.FAILURE_CLASS_TRANSIENT),
        ("ZeroDivisionError", "division by zero", job_pb2.FAILURE_CLASS_INTERNAL),
    ],
)
def test_reported_failures_are_classified(
    scripted: tuple[object, Stubs], exception_type: str, message: str, expected: int
) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    attempt.metrics(range(1, 4))
    failure = job_pb2.JobFailure(exception_type=exception_type, message=message, stage=S.STAGE_TRAINING, step=3)
    attempt.send([attempt.next(result=ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_FAILED, failure=failure))])
    job = stubs.get_job(attempt.job_id)
    assert [s.status for s in job.stages][S.STAGE_TRAINING - 1] == job_pb2.JobStage.STATUS_FAILED
    assert metric_seqs(stubs, attempt.job_id) == [1, 2, 3], "partial metrics are kept"
    if expected == job_pb2.FAILURE_CLASS_TRANSIENT:
        # System failures are recovered automatically, not failed.
        assert job.state == job_pb2.Job.STATE_RECOVERING
        assert job.recovery.failure_class == expected
        assert job.interruptions[-1].failure_class == expected
        assert job.interruptions[-1].step == 3
        return
    assert job.state == job_pb2.Job.STATE_FAILED
    assert job.failure.failure_class == expected
    assert job.failure.stage == S.STAGE_TRAINING
    assert job.failure.step == 3
    assert job.failure.reason
    assert job.failure.evidence
    assert job.failure.origin in (job_pb2.FAILURE_ORIGIN_USER, job_pb2.FAILURE_ORIGIN_SYSTEM)


def test_worker_killed_without_a_report_is_recovered_in_a_new_attempt(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    attempt.metrics(range(1, 11))
    attempt.kill(signal.SIGKILL)
    job = stubs.wait_state(attempt.job_id, {job_pb2.Job.STATE_RECOVERING, job_pb2.Job.STATE_PROVISIONING})
    (interruption,) = job.interruptions
    assert interruption.failure_class == job_pb2.FAILURE_CLASS_WORKER_LOST
    assert (interruption.attempt, interruption.step, interruption.recovered) == (1, 10, False)
    # A second worker starts after the backoff; its first training step completes the recovery.
    second = attach(stubs, attempt.job_id, attempt=2)
    assert second.pid != attempt.pid
    run_to_training(second)
    second.metrics(range(6, 8))  # resumed from a checkpoint at step 5
    job = stubs.get_job(attempt.job_id)
    assert job.attempt_count == 2
    assert job.state == job_pb2.Job.STATE_TRAINING
    (interruption,) = job.interruptions
    assert interruption.recovered
    assert (interruption.resumed_from_step, interruption.steps_lost) == (5, 5)
    assert interruption.downtime.ToTimedelta().total_seconds() > 0
    assert job.recovery.recovered_count == 1
    assert job.recovery.consecutive_failures == 0
    codes = [e.code for e in stubs.jobs.ListJobEvents(js.ListJobEventsRequest(job_id=job.id, page_size=1000)).events]
    assert "RECOVERY_SCHEDULED" in codes
    assert "RECOVERED" in codes


def test_repeated_failures_escalate_to_a_decision(tmp_path: Path, sleeper: Path) -> None:
    handle = start_server(tmp_path, trainer_python=str(sleeper), stop_grace_seconds=2.0)
    stubs = stubs_for(handle)
    try:
        dataset = stubs.upload_example()
        policy = job_pb2.RecoveryPolicy(max_system_retries=2, initial_backoff=duration_pb2.Duration(nanos=100_000_000))
        job = stubs.jobs.CreateJob(
            js.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model", recovery_policy=policy)
        )
        assert job.recovery_policy.max_system_retries == 2
        for number in (1, 2, 3):
            attempt = attach(stubs, job.id, attempt=number)
            attempt.kill(signal.SIGKILL)  # dies before any progress: the failures are consecutive
            if number < 3:
                stubs.wait_state(job.id, {job_pb2.Job.STATE_RECOVERING, job_pb2.Job.STATE_PROVISIONING})
        waiting = stubs.wait_state(job.id, {job_pb2.Job.STATE_AWAITING_DECISION})
        assert len(waiting.interruptions) == 3
        assert set(waiting.decision.choices) == {
            job_pb2.RECOVERY_CHOICE_KEEP_TRYING,
            job_pb2.RECOVERY_CHOICE_SWITCH_TO_ON_DEMAND,
            job_pb2.RECOVERY_CHOICE_CANCEL,
        }
        assert "2 automatic recoveries" in waiting.decision.reason
        switched = stubs.jobs.DecideRecovery(
            js.DecideRecoveryRequest(job_id=job.id, choice=job_pb2.RECOVERY_CHOICE_SWITCH_TO_ON_DEMAND)
        )
        assert switched.compute.pricing_tier == job_pb2.PRICING_TIER_ON_DEMAND
        assert switched.cost.hourly_rate_usd == 7.99
        attempt = attach(stubs, job.id, attempt=4)
        with pytest.raises(grpc.RpcError) as caught:
            stubs.jobs.DecideRecovery(js.DecideRecoveryRequest(job_id=job.id, choice=job_pb2.RECOVERY_CHOICE_CANCEL))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        attempt.kill(signal.SIGKILL)
    finally:
        stubs.channel.close()
        stop_server(handle)


def test_user_errors_are_never_retried_blindly(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    failure = job_pb2.JobFailure(exception_type="OutOfMemoryError", message="CUDA out of memory", step=0)
    outcome = ts.AttemptResult.OUTCOME_FAILED
    attempt.send([attempt.next(result=ts.AttemptResult(outcome=outcome, failure=failure))])
    attempt.kill(signal.SIGKILL)
    job = stubs.wait_state(attempt.job_id, TERMINAL)
    assert job.state == job_pb2.Job.STATE_FAILED
    assert job.attempt_count == 1
    assert list(job.interruptions) == []


def test_reports_left_in_the_outbox_are_ingested_when_the_worker_exits(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    delivered = attempt.seq
    # The trainer wrote these to its write-ahead outbox but never got them through.
    unsent = [attempt.next(metric=job_pb2.MetricPoint(step=s, train_loss=0.5)) for s in range(1, 6)]
    path = stage_adapter(attempt)
    unsent.append(attempt.next(stage=trainer_service_pb2.StageReport(stage=S.STAGE_FINALIZATION, status=RUNNING)))
    result = ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_SUCCEEDED, adapter_path=path, last_step=5)
    unsent.append(attempt.next(result=result))
    with open(attempt.attempt_dir / "reports.jsonl", "w") as f:
        for report in attempt.sent:  # the outbox holds every report, delivered or not
            f.write(json_format.MessageToJson(report, indent=None) + "\n")
        f.write('{"sequence": 99, "torn')  # a torn last line from a crash mid-write
    assert delivered < unsent[0].sequence
    attempt.kill(signal.SIGKILL)
    job = stubs.wait_state(attempt.job_id, TERMINAL)
    assert job.state == job_pb2.Job.STATE_COMPLETED, job.failure.message
    assert metric_seqs(stubs, attempt.job_id) == [1, 2, 3, 4, 5]


def test_cancel_running_job_directs_the_trainer_to_stop_then_cancels(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    attempt.metrics(range(1, 4))
    job = stubs.jobs.CancelJob(
        js.CancelJobRequest(job_id=attempt.job_id, reason=job_pb2.CANCEL_REASON_TESTING, note="enough")
    )
    assert job.state in (job_pb2.Job.STATE_CANCELLING, job_pb2.Job.STATE_CANCELLED)
    assert job.cancellation.reason == job_pb2.CANCEL_REASON_TESTING
    started = time.monotonic()
    final = stubs.wait_state(attempt.job_id, TERMINAL, timeout=60)
    assert final.state == job_pb2.Job.STATE_CANCELLED
    assert time.monotonic() - started < 60
    assert not Path(f"/proc/{attempt.pid}").exists() or _zombie(attempt.pid)
    assert metric_seqs(stubs, attempt.job_id) == [1, 2, 3], "partial metrics are kept"
    assert final.cancellation.note == "enough"
    assert final.cost.spend_usd > 0
    # Cancelling again is a no-op, not an error.
    again = stubs.jobs.CancelJob(js.CancelJobRequest(job_id=attempt.job_id, reason=job_pb2.CANCEL_REASON_OTHER))
    assert again.state == job_pb2.Job.STATE_CANCELLED
    assert again.cancellation.reason == job_pb2.CANCEL_REASON_TESTING


def test_stop_directive_reaches_a_live_trainer(scripted: tuple[object, Stubs]) -> None:
    """A trainer on another machine learns of a cancel from its next heartbeat."""
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    assert attempt.send([]).directive == trainer_service_pb2.DIRECTIVE_CONTINUE
    # Ignore SIGTERM so the worker outlives the cancel long enough to ask.
    os.kill(attempt.pid, signal.SIGSTOP)
    try:
        stubs.jobs.CancelJob(js.CancelJobRequest(job_id=attempt.job_id, reason=job_pb2.CANCEL_REASON_TESTING))
        assert attempt.send([]).directive == trainer_service_pb2.DIRECTIVE_STOP
    finally:
        # The executor may already have SIGKILLed it after the stop grace period.
        with contextlib.suppress(ProcessLookupError):
            os.kill(attempt.pid, signal.SIGCONT)
    assert stubs.wait_state(attempt.job_id, TERMINAL).state == job_pb2.Job.STATE_CANCELLED


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def test_metric_streams_replay_and_tail_identically(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    attempt.metrics(range(1, 51))

    received: dict[str, list[int]] = {"a": [], "b": [], "middle": []}

    def subscribe(name: str, start: int) -> None:
        request = job_service_pb2.StreamJobMetricsRequest(job_id=attempt.job_id, from_sequence=start)
        for response in stubs.jobs.StreamJobMetrics(request, timeout=60):
            received[name].append(response.metric.sequence)

    threads = [
        threading.Thread(target=subscribe, args=("a", 0)),
        threading.Thread(target=subscribe, args=("b", 1)),
        threading.Thread(target=subscribe, args=("middle", 30)),
    ]
    for t in threads:
        t.start()
    time.sleep(0.3)
    for chunk in range(51, 301, 50):  # live updates while the subscribers are attached
        attempt.metrics(range(chunk, chunk + 50))
    succeed(attempt, step=300)
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "the stream ends once the job is terminal"
    assert received["a"] == list(range(1, 301))
    assert received["b"] == received["a"]
    assert received["middle"] == list(range(30, 301))


def test_event_stream_filters_by_type_and_ends_at_terminal_state(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    attempt.send(
        [
            attempt.next(
                event=job_pb2.JobEvent(
                    type=job_pb2.JobEvent.TYPE_WARNING, code="TRUNCATED", message="3 examples truncated"
                )
            )
        ]
    )
    succeed(attempt, step=1)
    all_events = list(stubs.jobs.StreamJobEvents(js.StreamJobEventsRequest(job_id=attempt.job_id), timeout=30))
    seqs = [e.event.sequence for e in all_events]
    assert seqs == list(range(1, len(seqs) + 1))
    codes = [e.event.code for e in all_events]
    assert codes[0] == "JOB_CREATED"
    assert codes[-1] == "JOB_COMPLETED"
    assert "TRUNCATED" in codes
    warnings = list(
        stubs.jobs.StreamJobEvents(
            js.StreamJobEventsRequest(job_id=attempt.job_id, types=[job_pb2.JobEvent.TYPE_WARNING]),
            timeout=30,
        )
    )
    assert [w.event.code for w in warnings] == ["TRUNCATED"]
    searched = stubs.jobs.ListJobEvents(js.ListJobEventsRequest(job_id=attempt.job_id, query="truncated"))
    assert [e.code for e in searched.events] == ["TRUNCATED"]


def test_watch_job_streams_every_state_and_ends(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    states: list[int] = []
    versions: list[int] = []

    def watch() -> None:
        for response in stubs.jobs.WatchJob(job_service_pb2.WatchJobRequest(job_id=attempt.job_id), timeout=60):
            states.append(response.job.state)
            versions.append(response.job.version)

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.2)
    for stage in (S.STAGE_PREPROCESSING, S.STAGE_MODEL_LOADING, S.STAGE_TRAINING):
        attempt.stage(stage)
        time.sleep(0.15)
    succeed(attempt, step=1)
    t.join(30)
    assert not t.is_alive()
    assert versions == sorted(set(versions)), "versions only increase"
    assert states[-1] == job_pb2.Job.STATE_COMPLETED
    for state in (job_pb2.Job.STATE_PREPROCESSING, job_pb2.Job.STATE_MODEL_LOADING, job_pb2.Job.STATE_TRAINING):
        assert state in states


def test_success_without_a_finalization_report_still_publishes(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    run_to_training(attempt)
    path = stage_adapter(attempt)
    result = ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_SUCCEEDED, adapter_path=path)
    attempt.send([attempt.next(result=result)])
    assert stubs.get_job(attempt.job_id).state == job_pb2.Job.STATE_COMPLETED


def test_success_reported_before_training_fails_the_job_instead_of_wedging_it(scripted: tuple[object, Stubs]) -> None:
    _, stubs = scripted
    attempt = start_scripted_job(stubs)
    attempt.stage(S.STAGE_PREPROCESSING)
    result = ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_SUCCEEDED)
    response = attempt.send([attempt.next(result=result)])
    assert response.acknowledged_sequence == attempt.seq, "acknowledged, so the trainer does not resend forever"
    job = stubs.get_job(attempt.job_id)
    assert job.state == job_pb2.Job.STATE_FAILED
    assert job.failure.failure_class == job_pb2.FAILURE_CLASS_INTERNAL
