"""Graceful shutdown (SIGTERM) of a real server process: new calls are refused
with UNAVAILABLE / SHUTTING_DOWN and RetryInfo, open streams end with that same
status at once (no hang, no INTERNAL), in-flight calls finish, trainers keep
running; the next server re-attaches them and an SDK stream that was open
resumes from its cursor without a gap or a duplicate."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import brightrun
from brightrun.retry import RetryPolicy
from brightrun.v1 import (
    dataset_pb2,
    dataset_service_pb2,
    job_pb2,
    job_service_pb2,
    queue_service_pb2,
    queue_service_pb2_grpc,
)
from tests.conftest import EXAMPLES, auth_channel
from tests.durability.checks import stored_metrics, wait_training
from tests.durability.conftest import SMALL_CONFIG, ServerFactory
from tests.durability.harness import attempt_rows, connect, trainers

State = job_pb2.Job.State
LONG_CONFIG = job_pb2.TrainingConfig()
LONG_CONFIG.CopyFrom(SMALL_CONFIG)
LONG_CONFIG.epochs, LONG_CONFIG.max_steps, LONG_CONFIG.checkpoint_interval_steps = 3, 400, 100


@dataclass(frozen=True)
class Ending:
    """How a call ended: its status code, ErrorInfo reason and RetryInfo delay (None if absent)."""

    code: grpc.StatusCode
    reason: str
    retry_delay: float | None
    at: float


def ending(error: grpc.RpcError) -> Ending:
    reason, delay = "", None
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    return Ending(error.code(), reason, delay, time.monotonic())


SHUTTING_DOWN = (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", 1.0)


def summary(e: Ending | None) -> tuple[Any, ...] | None:
    return None if e is None else (e.code, e.reason, e.retry_delay)


@dataclass
class Subscriber:
    """Reads one server stream in a thread until it ends; keeps the items and how it ended."""

    name: str
    open_call: Callable[[], Iterator[Any]]
    items: list[Any] = field(default_factory=list)
    end: Ending | None = None
    clean_end: bool = False

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.open_call():
                self.items.append(item)
            self.clean_end = True
        except grpc.RpcError as e:
            self.end = ending(e)


@pytest.mark.slow
def test_sigterm_drains_streams_and_the_next_server_resumes_them(
    server_process: ServerFactory, tiny_model: Path
) -> None:
    server = server_process(max_concurrent_jobs=2).start()
    data_dir = server.data_dir
    api = connect(server.address)
    dataset = api.upload(EXAMPLES / "support_chat.jsonl")  # 152 steps an epoch
    job_id = api.create(dataset.id, str(tiny_model), LONG_CONFIG, name="drained").id
    queue = queue_service_pb2_grpc.QueueServiceStub(api.channel)
    subscribers = [
        Subscriber(
            "metrics", lambda: api.jobs.StreamJobMetrics(job_service_pb2.StreamJobMetricsRequest(job_id=job_id))
        ),
        Subscriber("events", lambda: api.jobs.StreamJobEvents(job_service_pb2.StreamJobEventsRequest(job_id=job_id))),
        Subscriber("watch", lambda: api.jobs.WatchJob(job_service_pb2.WatchJobRequest(job_id=job_id))),
        Subscriber("queue", lambda: queue.WatchQueue(queue_service_pb2.WatchQueueRequest())),
    ]
    # The SDK's resumable stream, patient enough to outlast the restart.
    client = brightrun.Client(server.address, retry=RetryPolicy(max_attempts=60, maximum=1.0))
    sdk_points: list[brightrun.MetricPoint] = []
    sdk_done = threading.Event()

    sdk_error: list[BaseException] = []

    def follow() -> None:
        try:
            for point in client.jobs.get(job_id).stream_metrics():
                sdk_points.append(point)
        except Exception as e:  # reported by the assertions below
            sdk_error.append(e)
        finally:
            sdk_done.set()

    threading.Thread(target=follow, name="sdk-stream", daemon=True).start()
    # An upload in flight when the signal comes: its request stream stays open until we finish it.
    upload_go = threading.Event()
    upload_result: list[Any] = []

    def upload_requests() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
        data = (EXAMPLES / "support_chat.jsonl").read_bytes()
        yield dataset_service_pb2.UploadDatasetRequest(
            metadata=dataset_service_pb2.UploadDatasetMetadata(filename="in-flight.jsonl")
        )
        yield dataset_service_pb2.UploadDatasetRequest(chunk=data[:1000])
        upload_go.wait(30)
        yield dataset_service_pb2.UploadDatasetRequest(chunk=data[1000:])

    def upload() -> None:
        try:
            upload_result.append(api.datasets.UploadDataset(upload_requests(), timeout=60))
        except grpc.RpcError as e:
            upload_result.append(ending(e))

    try:
        wait_training(api, [job_id], min_step=5)
        deadline = time.monotonic() + 30
        while not all(s.items for s in subscribers) or not sdk_points:
            assert time.monotonic() < deadline, [(s.name, len(s.items)) for s in subscribers]
            time.sleep(0.05)
        (attempt,) = attempt_rows(data_dir)
        assert attempt.pid is not None
        assert list(trainers(data_dir)) == [attempt.pid]
        uploader = threading.Thread(target=upload, name="upload", daemon=True)
        uploader.start()
        time.sleep(0.5)  # the upload has started and waits for its last chunk

        assert server.proc is not None
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # Every open stream ends promptly with the retryable shutdown status.
        for s in subscribers:
            s.thread.join(10)
            assert not s.thread.is_alive(), f"{s.name} stream still open 10 s after SIGTERM"
            assert (s.clean_end, summary(s.end)) == (False, SHUTTING_DOWN), s.name
            assert s.end is not None, s.name
            assert s.end.at - sent < 5, s.name
        # New calls are refused the same way while the in-flight upload drains.
        with pytest.raises(grpc.RpcError) as refused:
            api.get(job_id)
        assert summary(ending(refused.value)) == SHUTTING_DOWN
        with auth_channel(server.address) as other:  # a new connection too
            with pytest.raises(grpc.RpcError) as refused:
                connect_stubs(other).GetJob(job_service_pb2.GetJobRequest(job_id=job_id), timeout=10)
            assert summary(ending(refused.value)) == SHUTTING_DOWN
        upload_go.set()
        uploader.join(30)
        assert upload_result, upload_result
        assert isinstance(upload_result[0], dataset_pb2.Dataset), upload_result
        assert server.proc.wait(30) == 0, server.log_tail()
        # The trainer lives on, training, while no server runs.
        assert list(trainers(data_dir)) == [attempt.pid]
        assert not sdk_done.is_set()

        server.start()
        done = api.wait(job_id, timeout=180)
        assert sdk_done.wait(60), "the SDK stream did not end after the job completed"
        assert not sdk_error, sdk_error
    finally:
        upload_go.set()
        client.close()
        api.close()

    assert done.state == State.STATE_COMPLETED, done.state_message
    assert done.attempt_count == 1
    ((number, pid),) = [(a.number, a.pid) for a in attempt_rows(data_dir)]
    assert (number, pid) == (1, attempt.pid)
    assert f"re-attached to trainer pid {attempt.pid}" in server.logs()
    api = connect(server.address)
    try:
        stored = stored_metrics(api, job_id)
    finally:
        api.close()
    # The SDK stream that spanned both servers delivered exactly the stored sequence.
    assert [p.sequence for p in sdk_points] == [p.sequence for p in stored]
    assert [(p.step, p.train_loss) for p in sdk_points] == [
        (p.step, p.train_loss if p.HasField("train_loss") else None) for p in stored
    ]


def connect_stubs(channel: grpc.Channel) -> Any:
    from brightrun.v1 import job_service_pb2_grpc

    return job_service_pb2_grpc.JobServiceStub(channel)
