"""Stream resume: whatever breaks a stream mid-way — a proxy cutting it with
UNAVAILABLE, a premature normal end, the server itself stopping and starting
again during training — the SDK's iterators yield every item exactly once, in
order, and end when the job is terminal."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
from sdk_harness import TINY_JOB, Failure, FlakyProxy, RestartableServer

import brightrun
from brightrun import RetryPolicy
from tests.conftest import auth_channel

FAST = RetryPolicy(max_attempts=5, initial=0.02, maximum=0.1)


@pytest.fixture
def finished_job(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> brightrun.Job:
    return client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True).wait(timeout=60)


def test_event_stream_resumes_after_cuts(proxy: FlakyProxy, finished_job: brightrun.Job) -> None:
    expected = finished_job.events().to_list()
    assert len(expected) >= 4
    proxy.fail("StreamJobEvents", *[Failure(grpc.StatusCode.UNAVAILABLE, after=2)] * 20)
    with brightrun.Client(proxy.address, retry=FAST) as c:
        got = list(c.jobs.stream_events(finished_job.id))
    assert got == expected
    cursors = [r.from_sequence for r in proxy.requests["StreamJobEvents"]]
    assert cursors[0] == 1
    assert cursors[1:] == [e.sequence + 1 for e in expected[1::2]][: len(cursors) - 1]


def test_premature_normal_end_is_resumed(proxy: FlakyProxy, finished_job: brightrun.Job) -> None:
    """A stream that ends with OK before the job's last event (what a server
    shutting down does today) is reopened from the cursor."""
    expected = finished_job.events().to_list()
    proxy.fail("StreamJobEvents", Failure(code=None, after=1), Failure(code=None, after=1))
    with brightrun.Client(proxy.address, retry=FAST) as c:
        assert list(c.jobs.stream_events(finished_job.id)) == expected
    assert [r.from_sequence for r in proxy.requests["StreamJobEvents"]] == [1, 2, 3]


def test_filtered_stream_ends_and_resumes(proxy: FlakyProxy, finished_job: brightrun.Job) -> None:
    expected = [e for e in finished_job.events().to_list() if e.type is brightrun.EventType.STATUS]
    proxy.fail("StreamJobEvents", Failure(grpc.StatusCode.UNAVAILABLE, after=1))
    with brightrun.Client(proxy.address, retry=FAST) as c:
        assert list(c.jobs.stream_events(finished_job.id, types=["status"])) == expected


def test_stream_from_a_cursor(client: brightrun.Client, finished_job: brightrun.Job) -> None:
    everything = list(client.jobs.stream_events(finished_job.id))
    assert list(client.jobs.stream_events(finished_job.id, from_sequence=3)) == everything[2:]


def test_watch_resumes_after_cuts(proxy: FlakyProxy, finished_job: brightrun.Job) -> None:
    proxy.fail("WatchJob", Failure(grpc.StatusCode.UNAVAILABLE, after=0), Failure(code=None, after=0))
    with brightrun.Client(proxy.address, retry=FAST) as c:
        job = c.jobs.get(finished_job.id)
        snapshots = list(job.watch())
    assert [s.version for s in snapshots] == [finished_job.version]
    assert snapshots[0].is_terminal


def test_stream_gives_up_without_progress(proxy: FlakyProxy, finished_job: brightrun.Job) -> None:
    proxy.fail("StreamJobEvents", *[Failure(grpc.StatusCode.UNAVAILABLE, message="gone")] * 20)
    with brightrun.Client(proxy.address, retry=FAST) as c, pytest.raises(brightrun.UnavailableError, match="gone"):
        list(c.jobs.stream_events(finished_job.id))
    assert proxy.attempts("StreamJobEvents") == FAST.max_attempts


def test_stream_errors_that_are_not_transient_are_raised(client: brightrun.Client) -> None:
    with pytest.raises(brightrun.NotFoundError):
        list(client.jobs.stream_metrics("job_missing"))


def test_metric_stream_resumes_after_cuts(training_server: RestartableServer, completed_job: brightrun.Job) -> None:
    expected = completed_job.metrics().to_list()
    assert [m.sequence for m in expected] == list(range(1, len(expected) + 1))
    proxy = FlakyProxy(training_server.address)
    try:
        proxy.fail("StreamJobMetrics", *[Failure(grpc.StatusCode.UNAVAILABLE, after=3)] * 50)
        with brightrun.Client(proxy.address, retry=FAST) as c:
            assert list(c.jobs.stream_metrics(completed_job.id)) == expected
            middle = expected[len(expected) // 2].sequence
            assert list(c.jobs.stream_metrics(completed_job.id, from_sequence=middle)) == expected[middle - 1 :]
            assert [m.step for m in c.jobs.stream_metrics(completed_job.id, from_step=10)] == [
                m.step for m in expected if m.step >= 10
            ]
    finally:
        proxy.close()


async def test_async_streams_resume(training_server: RestartableServer, completed_job: brightrun.Job) -> None:
    expected_metrics = completed_job.metrics().to_list()
    expected_events = completed_job.events().to_list()
    proxy = FlakyProxy(training_server.address)
    try:
        proxy.fail("StreamJobMetrics", *[Failure(grpc.StatusCode.UNAVAILABLE, after=4)] * 50)
        proxy.fail("StreamJobEvents", Failure(code=None, after=2), Failure(grpc.StatusCode.UNAVAILABLE, after=1))
        async with brightrun.AsyncClient(proxy.address, retry=FAST) as c:
            job = await c.jobs.get(completed_job.id)
            metrics, events = await asyncio.gather(_collect(job.stream_metrics()), _collect(job.stream_events()))
        assert metrics == expected_metrics
        assert events == expected_events
    finally:
        proxy.close()


async def _collect(stream: object) -> list[object]:
    return [item async for item in stream]  # type: ignore[attr-defined]


def test_server_shutdown_ends_open_streams_with_unavailable(stuck_server: RestartableServer, chat_file: Path) -> None:
    """A server going away must not end a stream as if it were complete (the
    SDK would still cope: it checks GetJob after every normal end)."""
    from brightrun.v1 import job_service_pb2, job_service_pb2_grpc

    with brightrun.Client(stuck_server.address) as c:
        ds = c.datasets.upload(chat_file)
        job = c.jobs.create(dataset=ds, base_model="some/model", force=True)
    channel = auth_channel(stuck_server.address)
    try:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        call = stub.StreamJobEvents(job_service_pb2.StreamJobEventsRequest(job_id=job.id), timeout=30)
        stopper = threading.Timer(0.5, lambda: stuck_server.stop(kill_workers=True))
        stopper.start()
        try:
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:
                    pass
        finally:
            stopper.join()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        channel.close()


@pytest.mark.slow
def test_streams_survive_a_server_restart_during_training(tmp_path: Path, tiny_model: Path, chat_file: Path) -> None:
    """The real thing: stop the server mid-training (the trainer keeps running
    and resends its reports), start it again on the same port, and the SDK's
    metric, event and watch iterators — two sync subscribers and an async
    one — deliver gapless, duplicate-free sequences identical to the stored history."""
    server = RestartableServer(tmp_path / "data", max_concurrent_jobs=1).start()
    patient = RetryPolicy(max_attempts=12, initial=0.2, maximum=1.0)
    try:
        with brightrun.Client(server.address, retry=patient) as c:
            ds = c.datasets.upload(chat_file)
            job = c.jobs.create(dataset=ds, base_model=str(tiny_model), **{**TINY_JOB, "max_steps": 30})
            metrics: list[brightrun.MetricPoint] = []
            second: list[brightrun.MetricPoint] = []
            events: list[brightrun.JobEvent] = []
            states: list[brightrun.JobState] = []
            errors: list[BaseException] = []

            def follow(target: list[object], stream: object) -> None:
                try:
                    target.extend(stream)  # type: ignore[call-overload]
                except BaseException as e:  # pragma: no cover - surfaced below
                    errors.append(e)

            async def async_events() -> list[brightrun.JobEvent]:
                async with brightrun.AsyncClient(server.address, retry=patient) as ac:
                    return [e async for e in ac.jobs.stream_events(job.id)]

            async_result: list[brightrun.JobEvent] = []
            threads = [
                threading.Thread(target=follow, args=(metrics, job.stream_metrics())),
                threading.Thread(target=follow, args=(second, c.jobs.stream_metrics(job.id))),
                threading.Thread(target=follow, args=(states, (s.state for s in c.jobs.watch(job.id)))),
                threading.Thread(target=follow, args=(events, c.jobs.stream_events(job.id))),
                threading.Thread(target=lambda: async_result.extend(asyncio.run(async_events()))),
            ]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 120
            while len(metrics) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(metrics) >= 5, "training did not start"
            server.stop()  # trainers keep running
            time.sleep(1.5)
            server.start()
            for t in threads:
                t.join(180)
            assert not errors, errors
            final = c.jobs.get(job.id)
            assert final.state is brightrun.JobState.COMPLETED, final.failure
            stored = final.metrics().to_list()
            assert [m.sequence for m in metrics] == list(range(1, final.last_metric_sequence + 1))
            assert metrics == stored
            assert second == stored
            stored_events = final.events().to_list()
            assert events == stored_events
            assert async_result == stored_events
            assert states[-1] is brightrun.JobState.COMPLETED
            time.sleep(1.0)  # let the detached trainer process exit before the final stop
    finally:
        server.stop(kill_workers=True)
