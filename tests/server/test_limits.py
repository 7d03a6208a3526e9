"""Size limits on a real server: the largest upload, each project's dataset
storage, and the largest request message."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from brightrun.v1 import dataset_service_pb2, job_service_pb2
from brightrun_server.domain.caller import Role
from brightrun_server.settings import ServerSettings
from tests.conftest import EXAMPLES, ServerHandle, start_server, stop_server
from tests.server.conftest import Stubs, details, stubs_for

CHAT = (EXAMPLES / "support_chat.jsonl").read_bytes()
MiB = 1024 * 1024


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[ServerHandle, Stubs]]:
    # Room for two copies of the example dataset, not three; uploads up to 1.5 copies.
    handle = start_server(
        tmp_path,
        max_upload_bytes=len(CHAT) * 3 // 2,
        project_storage_bytes=len(CHAT) * 5 // 2,
        max_message_bytes=MiB * 2,
    )
    stubs = stubs_for(handle)
    yield handle, stubs
    stubs.channel.close()
    stop_server(handle)


def stored(handle: ServerHandle) -> list[str]:
    """What is left in the datasets directory (finished and partial uploads)."""
    root = handle.data_dir / "datasets"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def dataset_ids(stubs: Stubs) -> list[str]:
    return [d.id for d in stubs.datasets.ListDatasets(dataset_service_pb2.ListDatasetsRequest()).datasets]


def test_an_upload_over_the_limit_is_stopped_mid_stream_and_leaves_nothing(limited: tuple[ServerHandle, Stubs]) -> None:
    handle, stubs = limited
    limit = len(CHAT) * 3 // 2
    # No declared size: the server finds out as the chunks arrive.
    with pytest.raises(grpc.RpcError) as too_big:
        stubs.upload(CHAT * 2, filename="twice.jsonl")
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, _ = details(too_big.value)
    assert info.reason == "UPLOAD_TOO_LARGE"
    assert info.metadata["limit_bytes"] == str(limit)
    assert stored(handle) == [], "the partial file is removed"
    assert dataset_ids(stubs) == []

    # An endless upload is cut off: the server does not wait for its end.
    pulled = 0

    def endless() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
        nonlocal pulled
        yield dataset_service_pb2.UploadDatasetRequest(
            metadata=dataset_service_pb2.UploadDatasetMetadata(filename="endless.jsonl")
        )
        for _ in range(4096):  # 256 MiB if it were all read
            pulled += 1
            yield dataset_service_pb2.UploadDatasetRequest(chunk=CHAT[:65536])

    with pytest.raises(grpc.RpcError) as endless_error:
        stubs.datasets.UploadDataset(endless(), timeout=60)
    assert details(endless_error.value)[0].reason == "UPLOAD_TOO_LARGE"
    assert pulled < 4096
    assert stored(handle) == []

    # A declared size over the limit is refused before any byte is sent.
    with pytest.raises(grpc.RpcError) as declared:
        stubs.upload(CHAT, filename="claims-more.jsonl", size_bytes=limit + 1)
    assert declared.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(declared.value)[0].reason == "UPLOAD_TOO_LARGE"
    assert stored(handle) == []

    # Right at the limit is fine.
    at_limit = CHAT + CHAT[: limit - len(CHAT)]
    at_limit = at_limit[: at_limit.rfind(b"\n") + 1]
    assert stubs.upload(at_limit, filename="at-limit.jsonl").size_bytes == len(at_limit)


def test_the_project_storage_quota_counts_live_datasets_and_frees_on_delete(
    limited: tuple[ServerHandle, Stubs],
) -> None:
    handle, stubs = limited
    limit = len(CHAT) * 5 // 2
    first = stubs.upload(CHAT, filename="one.jsonl")
    stubs.upload(CHAT, filename="two.jsonl")

    with pytest.raises(grpc.RpcError) as full:
        stubs.upload(CHAT, filename="three.jsonl")
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, _ = details(full.value)
    assert info.reason == "STORAGE_QUOTA_EXCEEDED"
    assert info.metadata["used_bytes"] == str(2 * len(CHAT))
    assert info.metadata["limit_bytes"] == str(limit)
    # Declared sizes are checked up front too.
    with pytest.raises(grpc.RpcError) as declared:
        stubs.upload(CHAT, filename="three.jsonl", size_bytes=len(CHAT))
    assert details(declared.value)[0].reason == "STORAGE_QUOTA_EXCEEDED"
    assert len(dataset_ids(stubs)) == 2
    assert len(stored(handle)) == 2, "nothing of the refused uploads is kept"

    # The quota is per project: another project still has all of it.
    _, key = handle.run(handle.app.keys.insert(project="other", name="other", role=Role.MEMBER, created_by="test"))
    other = stubs_for(handle, key)
    try:
        other.upload(CHAT, filename="theirs.jsonl")
    finally:
        other.channel.close()

    stubs.datasets.DeleteDataset(dataset_service_pb2.DeleteDatasetRequest(dataset_id=first.id))
    assert stubs.upload(CHAT, filename="three.jsonl").size_bytes == len(CHAT)


def test_a_request_over_max_message_bytes_is_resource_exhausted(limited: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = limited
    with pytest.raises(grpc.RpcError) as big:
        stubs.jobs.CreateJob(job_service_pb2.CreateJobRequest(dataset_id="ds_x", name="x" * 3 * MiB))
    assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # An upload chunk is a message too.
    with pytest.raises(grpc.RpcError) as chunk:
        stubs.datasets.UploadDataset(
            iter(
                [
                    dataset_service_pb2.UploadDatasetRequest(
                        metadata=dataset_service_pb2.UploadDatasetMetadata(filename="big-chunk.jsonl")
                    ),
                    dataset_service_pb2.UploadDatasetRequest(chunk=b"x" * 3 * MiB),
                ]
            )
        )
    assert chunk.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Smaller messages still work.
    assert stubs.upload(CHAT, filename="ok.jsonl").id


def test_limit_settings_defaults() -> None:
    settings = ServerSettings()
    assert settings.max_message_bytes == 32 * 1024 * 1024
    assert settings.project_storage_bytes is None
    assert settings.max_upload_bytes == 10 * 1024**3
    assert settings.max_subscribers_per_job == 1000


def test_open_streams_per_job_are_limited_and_freed_on_close(tmp_path: Path, sleeper: Path) -> None:
    handle = start_server(tmp_path, trainer_python=str(sleeper), stop_grace_seconds=2.0, max_subscribers_per_job=3)
    stubs = stubs_for(handle)
    try:
        dataset = stubs.upload_example()
        first, other = (
            stubs.jobs.CreateJob(
                job_service_pb2.CreateJobRequest(
                    dataset_id=dataset.id, base_model="scripted/model", name=name, force=True
                )
            )
            for name in ("first", "other")
        )
        job_id = first.id
        streams = [
            stubs.jobs.StreamJobMetrics(job_service_pb2.StreamJobMetricsRequest(job_id=job_id), timeout=60),
            stubs.jobs.StreamJobEvents(job_service_pb2.StreamJobEventsRequest(job_id=job_id), timeout=60),
            stubs.jobs.WatchJob(job_service_pb2.WatchJobRequest(job_id=job_id), timeout=60),
        ]
        for call in streams:
            call.initial_metadata()  # the server has counted it
        assert handle.app.hub.subscribers(job_id) == 3
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(stubs.jobs.WatchJob(job_service_pb2.WatchJobRequest(job_id=job_id), timeout=10)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info, _ = details(refused.value)
        assert info.reason == "TOO_MANY_SUBSCRIBERS"
        assert (info.metadata["job_id"], info.metadata["limit"]) == (job_id, "3")
        # The limit is per job: another job's stream is served.
        assert next(iter(stubs.jobs.WatchJob(job_service_pb2.WatchJobRequest(job_id=other.id), timeout=10))).job.id
        # Closing a stream frees its place.
        streams.pop().cancel()
        deadline = time.monotonic() + 10
        while handle.app.hub.subscribers(job_id) != 2:
            assert time.monotonic() < deadline, handle.app.hub.subscribers(job_id)
            time.sleep(0.02)
        assert next(iter(stubs.jobs.WatchJob(job_service_pb2.WatchJobRequest(job_id=job_id), timeout=10))).job.id
        for call in streams:
            call.cancel()
    finally:
        stubs.channel.close()
        stop_server(handle)
