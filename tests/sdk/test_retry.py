"""Retries against real servers: a FlakyProxy (a real gRPC server that fails on
cue, then forwards to a real BrightRun server) and a server stopped and
started again on the same port. Nothing of the SDK is mocked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from sdk_harness import Failure, FlakyProxy, RestartableServer

import brightrun
from brightrun import RetryPolicy

FAST = RetryPolicy(max_attempts=4, initial=0.02, maximum=0.1)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _client(proxy: FlakyProxy, retry: RetryPolicy | None = FAST) -> brightrun.Client:
    return brightrun.Client(proxy.address, retry=retry)


def test_reads_retry_unavailable(proxy: FlakyProxy, idle_dataset: brightrun.Dataset) -> None:
    proxy.fail("GetDataset", Failure(UNAVAILABLE), Failure(UNAVAILABLE))
    with _client(proxy) as c:
        assert c.datasets.get(idle_dataset.id).id == idle_dataset.id
    assert proxy.attempts("GetDataset") == 3
    # Every attempt of one logical call carries the same correlation id.
    assert len({md["x-request-id"] for md in proxy.metadata["GetDataset"]}) == 1


def test_retries_give_up_after_max_attempts(proxy: FlakyProxy) -> None:
    proxy.fail("GetJob", *[Failure(UNAVAILABLE, message="still down")] * 10)
    with _client(proxy) as c, pytest.raises(brightrun.UnavailableError, match="still down"):
        c.jobs.get("job_x")
    assert proxy.attempts("GetJob") == FAST.max_attempts


def test_retry_none_disables_retries(proxy: FlakyProxy) -> None:
    proxy.fail("GetJob", Failure(UNAVAILABLE))
    with _client(proxy, retry=None) as c, pytest.raises(brightrun.UnavailableError):
        c.jobs.get("job_x")
    assert proxy.attempts("GetJob") == 1


def test_create_job_retry_reuses_the_request_id(proxy: FlakyProxy, idle_dataset: brightrun.Dataset) -> None:
    """The first attempt creates the job but its response is lost; the retry
    carries the same request_id, so it returns that job instead of a second one."""
    proxy.fail("CreateJob", Failure(UNAVAILABLE, after_forward=True), Failure(UNAVAILABLE, retry_delay=0.05))
    with _client(proxy) as c:
        job = c.jobs.create(dataset=idle_dataset, base_model="some/model", force=True, name="retried")
        requests = proxy.requests["CreateJob"]
        assert len(requests) == 3
        assert len({r.request_id for r in requests}) == 1
        assert job.request_id == requests[0].request_id
        same = [j for j in c.jobs.list(limit=200) if j.request_id == job.request_id]
        assert [j.id for j in same] == [job.id]


def test_upload_retry_reuses_the_request_id(proxy: FlakyProxy, chat_file: Path) -> None:
    proxy.fail("UploadDataset", Failure(UNAVAILABLE, after_forward=True))
    progress: list[int] = []
    with _client(proxy) as c:
        ds = c.datasets.upload(chat_file, progress=lambda sent, total: progress.append(sent))
    attempts = proxy.requests["UploadDataset"]
    assert len(attempts) == 2
    metadata = [messages[0].metadata for messages in attempts]
    assert metadata[0] == metadata[1]
    assert metadata[0].request_id == ds.request_id
    assert metadata[0].sha256 == ds.sha256
    assert b"".join(m.chunk for m in attempts[1][1:]) == chat_file.read_bytes()
    assert progress.count(0) == 2  # progress restarted with the retry


def test_resource_exhausted_retries_only_with_retry_info(proxy: FlakyProxy) -> None:
    proxy.fail("ListJobs", Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, reason="QUOTA"))
    with _client(proxy) as c:
        with pytest.raises(brightrun.ResourceExhaustedError) as info:
            c.jobs.list().first()
        assert info.value.reason == "QUOTA"
        assert info.value.retry_delay is None
        assert proxy.attempts("ListJobs") == 1

        proxy.fail("ListJobs", Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=0.4, reason="RATE_LIMITED"))
        start = time.monotonic()
        c.jobs.list().first()
        assert time.monotonic() - start >= 0.4  # the server's delay, not the policy's 0.02 s
        assert proxy.attempts("ListJobs") == 3


def test_too_long_a_server_delay_is_not_waited_for(proxy: FlakyProxy) -> None:
    proxy.fail("GetJob", Failure(UNAVAILABLE, retry_delay=600))
    with _client(proxy) as c, pytest.raises(brightrun.UnavailableError) as info:
        c.jobs.get("job_x")
    assert info.value.retry_delay is not None
    assert info.value.retry_delay.total_seconds() == 600
    assert proxy.attempts("GetJob") == 1


def test_deadline_exceeded_retries_reads_only(proxy: FlakyProxy, idle_dataset: brightrun.Dataset) -> None:
    deadline = grpc.StatusCode.DEADLINE_EXCEEDED
    proxy.fail("ListDatasets", Failure(deadline))
    proxy.fail("CreateJob", Failure(deadline))
    with _client(proxy) as c:
        assert c.datasets.list().first() is not None
        assert proxy.attempts("ListDatasets") == 2
        with pytest.raises(brightrun.DeadlineExceededError):
            c.jobs.create(dataset=idle_dataset, base_model="some/model", force=True)
        assert proxy.attempts("CreateJob") == 1


def test_delete_is_safe_to_retry(proxy: FlakyProxy, chat_file: Path) -> None:
    with _client(proxy) as c:
        first = c.datasets.upload(chat_file)
        proxy.fail("DeleteDataset", Failure(UNAVAILABLE))
        c.datasets.delete(first.id)
        assert proxy.attempts("DeleteDataset") == 2

        # The first attempt deleted it but the answer was lost: the retry finds
        # the dataset gone, which is what the caller asked for.
        second = c.datasets.upload(chat_file)
        proxy.fail("DeleteDataset", Failure(UNAVAILABLE, after_forward=True))
        c.datasets.delete(second.id)
        assert proxy.attempts("DeleteDataset") == 4
        with pytest.raises(brightrun.NotFoundError):
            c.datasets.get(second.id)


def test_writes_retry_when_the_server_refused_before_running() -> None:
    """SHUTTING_DOWN means the server refused the call before running it."""
    from brightrun.errors import UnavailableError
    from brightrun.retry import CallKind

    refused = UnavailableError("server is shutting down", reason="SHUTTING_DOWN")
    lost = UnavailableError("connection reset")
    assert FAST.should_retry(refused, CallKind.WRITE)
    assert not FAST.should_retry(lost, CallKind.WRITE)
    assert FAST.should_retry(lost, CallKind.IDEMPOTENT)
    assert FAST.should_retry(lost, CallKind.READ)


def test_resource_exhausted_repeats_writes_only_when_rate_limited() -> None:
    """RATE_LIMITED is refused before the call runs, so even a plain write is
    repeated after the server's delay; other exhaustion only reads and idempotent writes."""
    from datetime import timedelta

    from brightrun.errors import ResourceExhaustedError
    from brightrun.retry import CallKind

    delay = timedelta(seconds=0.2)
    limited = ResourceExhaustedError("slow down", reason="RATE_LIMITED", retry_delay=delay)
    busy = ResourceExhaustedError("too many subscribers", reason="TOO_MANY_SUBSCRIBERS", retry_delay=delay)
    assert all(FAST.should_retry(limited, kind) for kind in CallKind)
    assert FAST.should_retry(busy, CallKind.READ)
    assert FAST.should_retry(busy, CallKind.IDEMPOTENT)
    assert not FAST.should_retry(busy, CallKind.WRITE)
    assert FAST.delay(1, limited) == 0.2  # the server's delay, not the policy's backoff


async def test_async_retries(proxy: FlakyProxy, idle_dataset: brightrun.Dataset) -> None:
    proxy.fail("GetDataset", Failure(UNAVAILABLE), Failure(UNAVAILABLE, retry_delay=0.05))
    proxy.fail("CreateJob", Failure(UNAVAILABLE, after_forward=True))
    async with brightrun.AsyncClient(proxy.address, retry=FAST) as c:
        assert (await c.datasets.get(idle_dataset.id)).id == idle_dataset.id
        job = await c.jobs.create(dataset=idle_dataset, base_model="some/model", force=True)
    assert proxy.attempts("GetDataset") == 3
    requests = proxy.requests["CreateJob"]
    assert [r.request_id for r in requests] == [job.request_id] * 2
    proxy.fail("GetJob", *[Failure(UNAVAILABLE)] * 10)
    async with brightrun.AsyncClient(proxy.address, retry=FAST) as c:
        with pytest.raises(brightrun.UnavailableError):
            await c.jobs.get(job.id)
    assert proxy.attempts("GetJob") == FAST.max_attempts


def test_calls_survive_a_server_restart(tmp_path: Path, chat_file: Path) -> None:
    """Stop the server, call, start it again on the same port within the
    backoff window: the call succeeds without the caller noticing."""
    server = RestartableServer(tmp_path / "data").start()
    try:
        with brightrun.Client(server.address, retry=RetryPolicy(max_attempts=8, initial=0.2, maximum=1.0)) as c:
            ds = c.datasets.upload(chat_file)
            server.stop()
            with brightrun.Client(server.address, retry=None) as impatient, pytest.raises(brightrun.UnavailableError):
                impatient.datasets.get(ds.id)
            restart = threading.Timer(1.0, server.start)
            restart.start()
            try:
                start = time.monotonic()
                assert c.datasets.get(ds.id).id == ds.id
                assert time.monotonic() - start >= 0.9
            finally:
                restart.join()
    finally:
        server.stop(kill_workers=True)


def test_api_key_metadata_and_env(
    proxy: FlakyProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.fail("GetJob", Failure(UNAVAILABLE, message="blip"))
    with (
        brightrun.Client(proxy.address, api_key="sk-test", metadata=[("x-team", "nlp")], retry=FAST) as c,
        caplog.at_level("INFO", logger="brightrun"),
        pytest.raises(brightrun.AuthenticationError),  # the server behind the proxy knows neither key
    ):
        c.jobs.get("job_x")
    sent = proxy.metadata["GetJob"]
    assert all(md["authorization"] == "Bearer sk-test" and md["x-team"] == "nlp" for md in sent)
    assert "retrying after blip (TEST_FAILURE) (attempt 1 of 4" in caplog.text

    monkeypatch.setenv("BRIGHTRUN_TARGET", proxy.address)
    monkeypatch.setenv("BRIGHTRUN_API_KEY", "sk-env")
    with brightrun.Client() as c:
        assert c.target == proxy.address
        with pytest.raises(brightrun.AuthenticationError):
            c.jobs.get("job_y")
    assert proxy.metadata["GetJob"][-1]["authorization"] == "Bearer sk-env"
    monkeypatch.delenv("BRIGHTRUN_TARGET")
    assert brightrun.Client(api_key="").target == "127.0.0.1:50051"
