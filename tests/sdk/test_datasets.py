"""Datasets through the SDK against a real server: upload (progress, checksum,
idempotency), get, list, delete — sync and async."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import pytest

import brightrun
from brightrun import _protocol
from brightrun.v1 import dataset_service_pb2


def test_upload_reports_progress_and_checksums(client: brightrun.Client, chat_file: Path) -> None:
    calls: list[tuple[int, int]] = []
    ds = client.datasets.upload(
        chat_file, name="progress", chunk_size=16 * 1024, progress=lambda s, t: calls.append((s, t))
    )
    data = chat_file.read_bytes()
    assert ds.sha256 == hashlib.sha256(data).hexdigest()
    assert ds.size_bytes == len(data)
    assert ds.state is brightrun.DatasetState.READY
    assert ds.is_ready
    assert ds.format is brightrun.DatasetFormat.CHAT_JSONL
    assert ds.filename == chat_file.name
    assert ds.name == "progress"
    assert ds.stats.conversations > 0
    assert calls[0] == (0, len(data))
    assert calls[-1] == (len(data), len(data))
    sent = [s for s, _ in calls]
    assert sent == sorted(sent)
    assert len(calls) == 2 + len(data) // (16 * 1024)


def test_upload_with_the_same_request_id_is_idempotent(client: brightrun.Client, chat_file: Path) -> None:
    key = f"up-{uuid.uuid4()}"
    first = client.datasets.upload(chat_file, request_id=key)
    second = client.datasets.upload(chat_file, request_id=key)
    assert first.id == second.id
    assert first.request_id == key


def test_upload_fills_a_request_id(client: brightrun.Client, chat_file: Path) -> None:
    assert uuid.UUID(client.datasets.upload(chat_file).request_id)


def test_server_rejects_bytes_that_do_not_match_the_checksum(client: brightrun.Client, chat_file: Path) -> None:
    plan = _protocol.plan_upload(chat_file, name=None, format=None, request_id=None, chunk_size=64 * 1024)
    wrong = dataset_service_pb2.UploadDatasetMetadata()
    wrong.CopyFrom(plan.metadata)
    wrong.sha256 = "0" * 64
    with pytest.raises(brightrun.ApiError) as info:
        client.datasets._upload(_protocol.UploadPlan(plan.path, wrong, plan.chunk_size), None, None)
    assert info.value.reason == "UPLOAD_CORRUPTED"


def test_upload_format_and_invalid_files(client: brightrun.Client, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    ds = client.datasets.upload(broken, format="chat_jsonl")
    assert ds.format is brightrun.DatasetFormat.CHAT_JSONL
    assert ds.state is brightrun.DatasetState.INVALID
    assert ds.validation.critical_count >= 1
    assert ds.validation.first_errors
    with pytest.raises(brightrun.FailedPreconditionError) as info:
        client.jobs.create(dataset=ds, base_model="some/model", force=True)
    assert info.value.reason == "DATASET_INVALID"
    with pytest.raises(ValueError, match="unknown DatasetFormat"):
        client.datasets.upload(broken, format="csv")
    with pytest.raises(FileNotFoundError):
        client.datasets.upload(tmp_path / "missing.jsonl")


def test_get_list_delete(client: brightrun.Client, chat_file: Path) -> None:
    name = f"listed-{uuid.uuid4().hex[:8]}"
    made = [client.datasets.upload(chat_file, name=name) for _ in range(3)]
    assert client.datasets.get(made[0].id) == made[0]
    listed = list(client.datasets.list(filter=f'name = "{name}"', page_size=2))
    assert [d.id for d in listed] == [d.id for d in reversed(made)]
    pages = list(client.datasets.list(filter=f'name = "{name}"', page_size=2).iter_pages())
    assert [len(p) for p in pages] == [2, 1]
    client.datasets.delete(made[0].id)
    with pytest.raises(brightrun.NotFoundError):
        client.datasets.get(made[0].id)
    with pytest.raises(brightrun.NotFoundError):
        client.datasets.delete(made[0].id)  # a first attempt's NOT_FOUND is real


def test_dataset_in_use_cannot_be_deleted(stuck_server: object, chat_file: Path) -> None:
    with brightrun.Client(stuck_server.address) as c:  # type: ignore[attr-defined]
        ds = c.datasets.upload(chat_file)
        c.jobs.create(dataset=ds, base_model="some/model", force=True)
        with pytest.raises(brightrun.FailedPreconditionError) as info:
            c.datasets.delete(ds.id)
        assert info.value.reason == "DATASET_IN_USE"


async def test_async_datasets(aclient: brightrun.AsyncClient, chat_file: Path) -> None:
    calls: list[tuple[int, int]] = []
    key = f"aup-{uuid.uuid4()}"
    ds = await aclient.datasets.upload(chat_file, request_id=key, progress=lambda s, t: calls.append((s, t)))
    again = await aclient.datasets.upload(chat_file, request_id=key)
    assert again.id == ds.id
    assert ds.sha256 == hashlib.sha256(await asyncio.to_thread(chat_file.read_bytes)).hexdigest()
    assert calls[-1] == (ds.size_bytes, ds.size_bytes)
    assert await aclient.datasets.get(ds.id) == ds
    assert ds.id in [d.id async for d in aclient.datasets.list(page_size=1, limit=50)]
    await aclient.datasets.delete(ds.id)
    with pytest.raises(brightrun.NotFoundError):
        await aclient.datasets.get(ds.id)


class Stop(Exception):
    pass


def test_a_failing_progress_callback_aborts_the_upload_with_its_own_error(
    client: brightrun.Client, chat_file: Path
) -> None:
    def progress(sent: int, total: int) -> None:
        if sent > 0:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        client.datasets.upload(chat_file, chunk_size=8 * 1024, progress=progress)


async def test_async_failing_progress_callback(aclient: brightrun.AsyncClient, chat_file: Path) -> None:
    def progress(sent: int, total: int) -> None:
        if sent > 0:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        await aclient.datasets.upload(chat_file, chunk_size=8 * 1024, progress=progress)


def _broken_chat(tmp_path: Path) -> Path:
    lines = [
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
        "{not json",
        '{"messages": [{"role": "user"}]}',
        '{"messages": []}',
    ]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_validation_errors_paging_filters_and_export(client: brightrun.Client, tmp_path: Path) -> None:
    ds = client.datasets.upload(_broken_chat(tmp_path))
    assert ds.state is brightrun.DatasetState.INVALID
    assert ds.validation.quality_band
    assert sum(ds.validation.counts_by_type.values()) >= ds.validation.critical_count
    assert ds.validation.readiness
    issues = client.datasets.list_errors(ds.id, page_size=1).to_list()
    assert len(issues) >= 2
    assert all(isinstance(i, brightrun.DatasetIssue) for i in issues)
    pages = list(client.datasets.list_errors(ds.id, page_size=1).iter_pages())
    assert [i for p in pages for i in p.items] == issues
    assert pages[0].total_size == len(issues)
    malformed = [i for i in issues if i.type == "malformed_json"]
    assert malformed
    assert malformed[0].line == 2
    assert malformed[0].severity is brightrun.IssueSeverity.CRITICAL
    critical = client.datasets.list_errors(ds.id, critical_only=True).to_list()
    assert all(i.severity is brightrun.IssueSeverity.CRITICAL for i in critical)
    by_type = client.datasets.list_errors(ds.id, order_by="type").to_list()
    assert [i.type for i in by_type] == sorted(i.type for i in by_type)
    with_context = client.datasets.list_errors(ds.id, types=["malformed_json"], include_context=True).to_list()
    assert with_context[0].context is not None
    assert any(line.marked for line in with_context[0].context.lines)

    csv_text = b"".join(client.datasets.export_errors(ds.id)).decode()
    rows = csv_text.strip().splitlines()
    assert len(rows) == 1 + len(issues)
    assert "malformed_json" in csv_text


def test_revalidate(client: brightrun.Client, chat_file: Path) -> None:
    ds = client.datasets.upload(chat_file)
    again = client.datasets.validate(ds.id, max_seq_length=1024)
    assert again.id == ds.id
    assert again.state is brightrun.DatasetState.READY
    assert again.validation.validate_time is not None
    assert ds.validation.validate_time is not None
    assert again.validation.validate_time >= ds.validation.validate_time


async def test_async_validation_errors(aclient: brightrun.AsyncClient, tmp_path: Path) -> None:
    path = await asyncio.to_thread(_broken_chat, tmp_path)
    ds = await aclient.datasets.upload(path)
    issues = await aclient.datasets.list_errors(ds.id, page_size=2).to_list()
    assert issues
    chunks = [chunk async for chunk in aclient.datasets.export_errors(ds.id, critical_only=True)]
    assert b"".join(chunks).decode().count("\n") >= 2
    assert (await aclient.datasets.validate(ds.id)).state is brightrun.DatasetState.INVALID
