"""The Reporter against a real gRPC TrainerService that fails, drops and forgets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brightrun_trainer.callbacks import (
    CheckpointInfo,
    EventCode,
    Outcome,
    ResultInfo,
    StageName,
    StageStatus,
    StepMetrics,
)
from brightrun_trainer.report import MAX_BATCH, Reporter, read_outbox
from brightrun_trainer.spec import ReportTarget
from tests.trainer.trainer_harness import TOKEN, FlakyTrainerService, free_port, serve


@pytest.fixture
def service() -> FlakyTrainerService:
    return FlakyTrainerService()


@pytest.fixture
def server_port(service: FlakyTrainerService) -> Iterator[int]:
    server, port = serve(service)
    yield port
    server.stop(None)


def make_reporter(tmp_path: Path, port: int, **kwargs: Any) -> Reporter:
    kwargs.setdefault("heartbeat_seconds", 5.0)
    kwargs.setdefault("backoff", (0.01, 0.1))
    return Reporter(
        attempt_id="att_1",
        attempt_number=1,
        outbox_path=tmp_path / "reports.jsonl",
        target=ReportTarget(address=f"127.0.0.1:{port}", token=TOKEN),
        **kwargs,
    )


def emit_many(reporter: Reporter, n: int) -> None:
    """n reports of every kind, in bursts, with the last one a result."""
    for i in range(1, n):
        kind = i % 5
        if kind == 0:
            reporter.on_stage(StageName.TRAINING, StageStatus.RUNNING, f"step {i}", 0.5)
        elif kind == 1:
            reporter.on_metric(StepMetrics(step=i, epoch=i / 100, train_loss=1.0 / i))
        elif kind == 2:
            reporter.info(EventCode.EVALUATION, f"event {i}", step=i)
        elif kind == 3:
            reporter.on_checkpoint(CheckpointInfo(i, 0.1, f"checkpoints/step-{i}", 10, "ab"))
        else:
            reporter.on_progress(i, n, i / 100, 1)
        if i % 97 == 0:
            time.sleep(0.02)
    reporter.on_result(ResultInfo(Outcome.SUCCEEDED, last_step=n))


def assert_exactly_once_in_order(service: FlakyTrainerService, outbox: Path, n: int) -> None:
    assert [r.sequence for r in service.stored] == list(range(1, n + 1))
    assert service.gaps == 0
    assert service.max_batch <= MAX_BATCH
    assert [r.sequence for r in read_outbox(outbox)] == list(range(1, n + 1))
    assert [r.SerializeToString() for r in read_outbox(outbox)] == [r.SerializeToString() for r in service.stored]
    assert service.stored[-1].WhichOneof("report") == "result"


def test_every_report_is_delivered_once_in_order_despite_failures(tmp_path: Path) -> None:
    service = FlakyTrainerService(chaos=0.5, fail_first=3)
    server, port = serve(service)
    try:
        reporter = make_reporter(tmp_path, port)
        reporter.start()
        emit_many(reporter, 1500)
        assert reporter.close(timeout=60)
    finally:
        server.stop(None)
    assert_exactly_once_in_order(service, tmp_path / "reports.jsonl", 1500)
    assert service.calls > 10  # batches, not one call per report, yet many calls


def test_reports_survive_a_server_that_starts_late(tmp_path: Path) -> None:
    port = free_port()
    reporter = make_reporter(tmp_path, port)
    reporter.start()
    emit_many(reporter, 50)
    time.sleep(0.5)
    service = FlakyTrainerService()
    server, _ = serve(service, port)
    try:
        assert reporter.close(timeout=30)
    finally:
        server.stop(None)
    assert_exactly_once_in_order(service, tmp_path / "reports.jsonl", 50)


def test_acknowledgement_going_backwards_resends_from_the_outbox(tmp_path: Path) -> None:
    service = FlakyTrainerService(forget_at=300)
    server, port = serve(service)
    try:
        reporter = make_reporter(tmp_path, port)
        reporter.start()
        emit_many(reporter, 600)
        assert reporter.close(timeout=30)
    finally:
        server.stop(None)
    assert_exactly_once_in_order(service, tmp_path / "reports.jsonl", 600)


def test_idle_reporter_sends_heartbeats(tmp_path: Path, service: FlakyTrainerService, server_port: int) -> None:
    reporter = make_reporter(tmp_path, server_port, heartbeat_seconds=0.1)
    reporter.start()
    time.sleep(0.8)
    assert reporter.close(timeout=5)
    assert service.empty_calls >= 3
    assert service.stored == []


def test_stop_directive_calls_back_once(tmp_path: Path) -> None:
    service = FlakyTrainerService(stop_after=5)
    server, port = serve(service)
    stops: list[float] = []
    try:
        reporter = make_reporter(tmp_path, port, on_stop_directive=lambda: stops.append(1))
        reporter.start()
        emit_many(reporter, 20)
        assert reporter.close(timeout=10)
    finally:
        server.stop(None)
    assert stops == [1]


def test_without_a_target_reports_only_go_to_the_outbox(tmp_path: Path) -> None:
    reporter = Reporter(attempt_id="a", attempt_number=2, outbox_path=tmp_path / "o.jsonl", target=None)
    reporter.start()
    emit_many(reporter, 10)
    assert reporter.close(timeout=1)
    reports = read_outbox(tmp_path / "o.jsonl")
    assert [r.sequence for r in reports] == list(range(1, 11))
    metric = next(r.metric for r in reports if r.WhichOneof("report") == "metric")
    assert metric.attempt == 2
    assert metric.HasField("train_loss")
    assert not metric.HasField("eval_loss")


def test_a_reused_outbox_continues_numbering_after_cutting_a_torn_line(tmp_path: Path) -> None:
    outbox = tmp_path / "o.jsonl"
    first = Reporter(attempt_id="a", attempt_number=1, outbox_path=outbox, target=None)
    emit_many(first, 5)
    first.close(timeout=1)
    with open(outbox, "a", encoding="utf-8") as f:
        f.write('{"sequence":"6","time":"2026-')  # the process died mid-write
    second = Reporter(attempt_id="a", attempt_number=1, outbox_path=outbox, target=None)
    emit_many(second, 3)
    second.close(timeout=1)
    assert [r.sequence for r in read_outbox(outbox)] == list(range(1, 9))
    assert outbox.read_text().count("\n") == 8
