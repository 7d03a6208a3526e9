"""The queue, many-job calls and usage through the SDK against real servers:
positions and promotion with its audit log, the queue watch (and its
reconnection), CSV export, bulk cancel, project usage — sync and async."""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdk_harness import Failure, FlakyProxy, RestartableServer, Trainer, wait_for

import brightrun
from brightrun import JobState, PromotionReason

JUSTIFICATION = (
    "The client's launch review moved up to Thursday and this adapter has to be evaluated before it; "
    "every other job here can wait a day."
)


@pytest.fixture
def queued(
    one_slot_server: RestartableServer, chat_file: Path
) -> Iterator[tuple[brightrun.Client, brightrun.Job, list[brightrun.Job]]]:
    """One job holding the only slot (its trainer attached) and three waiting."""
    with brightrun.Client(one_slot_server.address) as client:
        ds = client.datasets.upload(chat_file)
        running = client.jobs.create(dataset=ds, base_model="scripted/model", name="running", force=True)
        trainer = Trainer(one_slot_server.address, running.id)
        waiting = [
            client.jobs.create(dataset=ds, base_model="scripted/model", name=f"waiting {i}", force=True)
            for i in range(3)
        ]
        try:
            yield client, running, waiting
        finally:
            trainer.close()


def test_queue_positions_promotion_and_audit(
    queued: tuple[brightrun.Client, brightrun.Job, list[brightrun.Job]],
) -> None:
    client, running, waiting = queued
    snapshot = client.queue.get()
    assert isinstance(snapshot, brightrun.QueueSnapshot)
    assert [q.job_id for q in snapshot.queued] == [w.id for w in waiting]
    assert [q.position for q in snapshot.queued] == [1, 2, 3]
    assert all(q.estimated_start_time is not None for q in snapshot.queued)
    assert [a.job_id for a in snapshot.active] == [running.id]
    assert snapshot.active[0].state is JobState.PROVISIONING
    assert [(p.name, p.slots, p.used) for p in snapshot.pools] == [("local", 1, 1)]
    assert (snapshot.stats.depth, snapshot.stats.active) == (3, 1)
    assert snapshot.version > 0
    third = snapshot.position(waiting[2].id)
    assert third is not None
    assert third.position == 3
    assert snapshot.position(running.id) is None
    info = client.jobs.get(waiting[2].id).queue
    assert info is not None
    assert info.position == 3

    with pytest.raises(ValueError, match="must be 100 to 500 characters"):
        client.queue.promote(waiting[2], reason="client_deadline", justification="soon")
    with pytest.raises(ValueError, match="a promotion reason is required"):
        client.queue.promote(waiting[2], reason="unspecified", justification=JUSTIFICATION)
    with pytest.raises(ValueError, match="unknown PromotionReason"):
        client.queue.promote(waiting[2], reason="boredom", justification=JUSTIFICATION)
    with pytest.raises(brightrun.FailedPreconditionError) as not_waiting:
        running.promote("urgent_fix", JUSTIFICATION)
    assert not_waiting.value.reason == "JOB_STATE_CONFLICT"

    promotion = client.queue.promote(waiting[2], reason="client_deadline", justification=JUSTIFICATION)
    assert isinstance(promotion, brightrun.Promotion)
    assert isinstance(promotion.job, brightrun.Job)
    assert promotion.job.id == waiting[2].id
    assert promotion.job.promote_time is not None
    assert promotion.job.reload().promote_time is not None  # a bound handle
    assert {d.job_id for d in promotion.delayed} == {waiting[0].id, waiting[1].id}
    assert all(d.delay is not None and d.delay.total_seconds() > 0 for d in promotion.delayed)
    audit = promotion.audit
    assert audit is not None
    assert (audit.job_id, audit.action, audit.reason) == (waiting[2].id, "promote", PromotionReason.CLIENT_DEADLINE)
    assert audit.justification == JUSTIFICATION
    assert audit.actor
    assert set(audit.delayed_job_ids) == {waiting[0].id, waiting[1].id}
    assert [q.job_id for q in client.queue.get().queued] == [waiting[2].id, waiting[0].id, waiting[1].id]

    second = waiting[1].promote(PromotionReason.URGENT_FIX, JUSTIFICATION)  # the handle's own method
    assert waiting[1].promote_time is not None, "the handle is updated"
    assert second.job.id == waiting[1].id
    entries = list(client.queue.audit(page_size=1))
    assert [e.job_id for e in entries] == [waiting[1].id, waiting[2].id]  # newest first, over two pages
    assert [len(p) for p in client.queue.audit(page_size=1).iter_pages()] == [1, 1]
    assert client.queue.audit(limit=1).to_list() == entries[:1]


def test_queue_watch_resumes_after_a_disconnect_without_repeating_a_snapshot(
    queued: tuple[brightrun.Client, brightrun.Job, list[brightrun.Job]],
) -> None:
    client, _, waiting = queued
    proxy = FlakyProxy(client.target)
    seen: list[brightrun.QueueSnapshot] = []
    done = threading.Event()
    try:
        proxy.fail("WatchQueue", Failure(after=1))  # the first stream breaks after one snapshot

        def watch() -> None:
            with brightrun.Client(proxy.address) as flaky:
                for snapshot in flaky.queue.watch(timeout=20):
                    seen.append(snapshot)
                    if snapshot.queued and snapshot.queued[0].job_id == waiting[2].id:
                        break
            done.set()

        thread = threading.Thread(target=watch)
        thread.start()
        wait_for(lambda: proxy.attempts("WatchQueue") >= 2, timeout=20)  # reconnected
        client.queue.promote(waiting[2].id, reason="manager_override", justification=JUSTIFICATION)
        thread.join(25)
        assert done.is_set()
    finally:
        proxy.close()
    versions = [s.version for s in seen]
    assert versions == sorted(set(versions)), "no snapshot twice, in order"
    assert [q.job_id for q in seen[0].queued] == [w.id for w in waiting]
    assert [q.job_id for q in seen[-1].queued] == [waiting[2].id, waiting[0].id, waiting[1].id]

    quiet = list(client.queue.watch(timeout=0.5))  # a timeout ends the watch quietly
    assert len(quiet) >= 1


def test_export_bulk_cancel_and_usage(
    queued: tuple[brightrun.Client, brightrun.Job, list[brightrun.Job]], tmp_path: Path
) -> None:
    client, running, waiting = queued
    path = tmp_path / "jobs.csv"
    written = client.jobs.export(path, order_by="name")
    assert written == path.stat().st_size
    text = path.read_bytes().decode()
    assert not (tmp_path / "jobs.csv.part").exists()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["name"] for r in rows] == ["running", "waiting 0", "waiting 1", "waiting 2"]
    assert {"id", "state", "spend_usd"} <= set(rows[0])
    as_text = io.StringIO()
    client.jobs.export(as_text, state="queued", order_by="name")
    assert [r["name"] for r in csv.DictReader(io.StringIO(as_text.getvalue()))] == [w.name for w in waiting]
    as_bytes = io.BytesIO()
    client.jobs.export(as_bytes, query="waiting 1")
    assert b"waiting 1" in as_bytes.getvalue()
    assert b"".join(client.jobs.iter_export(filter='name = "running"')).decode().count("\n") == 2
    with pytest.raises(brightrun.InvalidArgumentError):
        client.jobs.export(tmp_path / "bad.csv", order_by="colour")
    assert not (tmp_path / "bad.csv").exists()
    assert not (tmp_path / "bad.csv.part").exists(), "a failed export leaves nothing behind"
    with pytest.raises(TypeError, match="a path or a writable file"):
        client.jobs.export(42)  # type: ignore[arg-type]

    usage = client.projects.usage(months=3)
    assert isinstance(usage, brightrun.Usage)
    assert usage.project == "default"
    assert usage.gpu_hours_quota is None  # unlimited on this server
    assert usage.reset_time is not None
    assert usage.reset_time.day == 1
    assert len(usage.months) == 3
    assert all(len(m.month) == 7 for m in usage.months)

    with pytest.raises(ValueError, match="needs job ids or a filter"):
        client.jobs.bulk_cancel(reason="testing")
    with pytest.raises(ValueError, match="a cancel reason is required"):
        client.jobs.bulk_cancel([running], reason="unspecified")
    proxy = FlakyProxy(client.target)
    try:
        proxy.fail("BulkCancelJobs", Failure(), Failure())
        with brightrun.Client(proxy.address) as flaky:
            with pytest.raises(brightrun.UnavailableError):
                flaky.jobs.bulk_cancel(state="queued", reason="testing")  # by filter: not repeated
            assert proxy.attempts("BulkCancelJobs") == 1
            (by_id,) = flaky.jobs.bulk_cancel([running.id], reason="testing")  # by id: repeated
            assert proxy.attempts("BulkCancelJobs") == 3
    finally:
        proxy.close()
    assert by_id.ok
    results = client.jobs.bulk_cancel([running], state="queued", reason="testing", note="bulk")
    assert results[0].job_id == running.id  # the ids named first, then the filter's jobs (newest first)
    assert [r.job_id for r in results[1:]] == [w.id for w in reversed(waiting)]
    assert all(r.ok for r in results)
    assert all(isinstance(r, brightrun.BulkCancelResult) for r in results)
    assert {r.state for r in results} <= {JobState.CANCELLING, JobState.CANCELLED}
    assert client.jobs.wait(running.id, timeout=20).state is JobState.CANCELLED
    again = client.jobs.bulk_cancel([running.id], reason="testing")
    assert again[0].ok, "cancelling a cancelled job is not an error"


def test_promoting_the_middle_job_delays_only_the_job_it_passes(
    queued: tuple[brightrun.Client, brightrun.Job, list[brightrun.Job]],
) -> None:
    client, _, waiting = queued
    promotion = client.queue.promote(waiting[1], reason="urgent_fix", justification=JUSTIFICATION)
    assert [d.job_id for d in promotion.delayed] == [waiting[0].id]


async def test_async_queue_and_usage(
    queued: tuple[brightrun.Client, brightrun.Job, list[brightrun.Job]], tmp_path: Path
) -> None:
    client, _, waiting = queued
    async with brightrun.AsyncClient(client.target) as aclient:
        snapshot = await aclient.queue.get()
        assert [q.job_id for q in snapshot.queued] == [w.id for w in waiting]
        job = await aclient.jobs.get(waiting[1].id)
        promotion = await job.promote("critical_business_need", JUSTIFICATION)
        assert isinstance(promotion.job, brightrun.AsyncJob)
        assert waiting[0].id in {d.job_id for d in promotion.delayed}
        other = await aclient.queue.promote(waiting[2].id, reason="urgent_fix", justification=JUSTIFICATION)
        assert other.audit is not None
        assert [e.job_id async for e in aclient.queue.audit()] == [waiting[2].id, waiting[1].id]
        watched = [s async for s in aclient.queue.watch(timeout=0.5)]
        assert watched
        assert watched[0].queued[0].job_id == waiting[2].id
        usage = await aclient.projects.usage()
        assert len(usage.months) == 6
        path = tmp_path / "async.csv"
        written = await aclient.jobs.export(path, state="queued")
        assert written == path.stat().st_size
        assert b"".join([c async for c in aclient.jobs.iter_export(state="queued")]) == path.read_bytes()
        results = await aclient.jobs.bulk_cancel(state="queued", reason="testing")
        assert {r.job_id for r in results} == {w.id for w in waiting}
