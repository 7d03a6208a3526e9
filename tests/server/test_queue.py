"""Queue and scheduling, listing, cost and usage over the wire (issue 6)."""

from __future__ import annotations

import csv
import io
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from brightrun.v1 import api_key_service_pb2, job_pb2, project_service_pb2_grpc, queue_service_pb2_grpc
from brightrun.v1 import job_service_pb2 as js
from brightrun.v1 import project_service_pb2 as ps
from brightrun.v1 import queue_service_pb2 as qs
from tests.conftest import ServerHandle, start_server, stop_server
from tests.server.conftest import TERMINAL, Stubs, attach, details, stubs_for

JUSTIFICATION = (
    "The client's launch review moved up to Thursday and this adapter has to be evaluated before it; "
    "every other job here can wait a day."
)


@pytest.fixture
def one_slot(tmp_path: Path, sleeper: Path) -> Iterator[tuple[ServerHandle, Stubs]]:
    handle = start_server(
        tmp_path,
        trainer_python=str(sleeper),
        stop_grace_seconds=1.0,
        max_concurrent_jobs=1,
        provisioning_buffer_seconds=60,
        default_job_duration_seconds=600,
    )
    admin = stubs_for(handle)
    # Jobs and promotions record the key's name as who did them.
    stubs = stubs_for(handle, admin.new_key("ana@example.com", api_key_service_pb2.ROLE_ADMIN))
    yield handle, stubs
    stubs.channel.close()
    admin.channel.close()
    stop_server(handle)


def create(stubs: Stubs, dataset_id: str, name: str, **fields: object) -> job_pb2.Job:
    job: job_pb2.Job = stubs.jobs.CreateJob(
        js.CreateJobRequest(dataset_id=dataset_id, base_model="scripted/model", name=name, force=True, **fields),
    )
    return job


def test_double_start_guard(stubs: Stubs) -> None:
    dataset = stubs.upload_example()
    first = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="/nonexistent/model"))
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="/nonexistent/model", name="again"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info, _ = details(caught.value)
    assert (info.reason, info.metadata["job_id"]) == ("DUPLICATE_JOB", first.id)
    assert first.id in caught.value.details()
    other = stubs.jobs.CreateJob(
        js.CreateJobRequest(
            dataset_id=dataset.id, base_model="/nonexistent/model", overrides=job_pb2.TrainingConfig(lora_rank=8)
        )
    )
    assert other.config_fingerprint != first.config_fingerprint, "another configuration is not a duplicate"
    forced = stubs.jobs.CreateJob(
        js.CreateJobRequest(dataset_id=dataset.id, base_model="/nonexistent/model", force=True)
    )
    assert forced.id != first.id


def test_queue_positions_promotion_audit_and_order(one_slot: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = one_slot
    queue = queue_service_pb2_grpc.QueueServiceStub(stubs.channel)
    dataset = stubs.upload_example()
    running = create(stubs, dataset.id, "running")
    worker = attach(stubs, running.id)
    waiting = [create(stubs, dataset.id, f"waiting {i}") for i in range(3)]
    snapshot = queue.GetQueue(qs.GetQueueRequest())
    assert [q.job_id for q in snapshot.queued] == [w.id for w in waiting]
    assert [q.position for q in snapshot.queued] == [1, 2, 3]
    starts = [q.estimated_start_time.ToDatetime() for q in snapshot.queued]
    assert starts == sorted(starts)
    assert [q.confidence for q in snapshot.queued] == ["medium", "medium", "medium"]
    assert [a.job_id for a in snapshot.active] == [running.id]
    assert (snapshot.stats.depth, snapshot.stats.active) == (3, 1)
    assert [(p.name, p.slots, p.used) for p in snapshot.pools] == [("local", 1, 1)]
    job = stubs.get_job(waiting[2].id)
    assert (job.queue.position, job.queue.confidence) == (3, "medium")

    with pytest.raises(grpc.RpcError) as caught:
        queue.PromoteJob(
            qs.PromoteJobRequest(job_id=waiting[2].id, reason=qs.PROMOTION_REASON_CLIENT_DEADLINE, justification="soon")
        )
    assert details(caught.value)[1][0][0] == "justification"
    with pytest.raises(grpc.RpcError) as caught:
        queue.PromoteJob(
            qs.PromoteJobRequest(
                job_id=running.id, reason=qs.PROMOTION_REASON_CLIENT_DEADLINE, justification=JUSTIFICATION
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    watched: list[list[str]] = []

    def watch() -> None:
        for response in queue.WatchQueue(qs.WatchQueueRequest(), timeout=10):
            watched.append([q.job_id for q in response.queue.queued])
            if len(watched) >= 2:
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.5)
    promoted = queue.PromoteJob(
        qs.PromoteJobRequest(
            job_id=waiting[2].id, reason=qs.PROMOTION_REASON_CLIENT_DEADLINE, justification=JUSTIFICATION
        ),
    )
    assert promoted.job.promote_time.seconds > 0
    assert {d.job_id for d in promoted.delayed} == {waiting[0].id, waiting[1].id}
    assert all(d.delay.ToTimedelta().total_seconds() > 0 for d in promoted.delayed)
    assert promoted.audit.actor == "ana@example.com"
    assert promoted.audit.justification == JUSTIFICATION
    assert set(promoted.audit.delayed_job_ids) == {waiting[0].id, waiting[1].id}
    after = queue.GetQueue(qs.GetQueueRequest())
    assert [q.job_id for q in after.queued] == [waiting[2].id, waiting[0].id, waiting[1].id]
    assert after.queued[0].promoted
    watcher.join(15)
    assert watched[-1] == [waiting[2].id, waiting[0].id, waiting[1].id]
    audit = queue.ListQueueAudit(qs.ListQueueAuditRequest())
    assert [e.job_id for e in audit.entries] == [waiting[2].id]
    assert audit.entries[0].reason == qs.PROMOTION_REASON_CLIENT_DEADLINE

    # The scheduler starts the promoted job when the slot frees.
    worker.kill(signal.SIGKILL)
    stubs.jobs.CancelJob(js.CancelJobRequest(job_id=running.id, reason=job_pb2.CANCEL_REASON_TESTING))
    next_worker = attach(stubs, waiting[2].id)
    next_worker.kill(signal.SIGKILL)


def test_a_recovering_job_keeps_its_slot_through_its_backoff(one_slot: tuple[ServerHandle, Stubs]) -> None:
    """An interrupted job's slot is not handed to the queue while it waits out its
    backoff: otherwise its recovery would wait for a whole other job to finish."""
    _, stubs = one_slot
    dataset = stubs.upload_example()
    policy = job_pb2.RecoveryPolicy(initial_backoff=duration_pb2.Duration(seconds=3))
    interrupted = create(stubs, dataset.id, "interrupted", recovery_policy=policy)
    stubs.wait_state(interrupted.id, {job_pb2.Job.STATE_PROVISIONING})
    first = attach(stubs, interrupted.id)
    waiting = create(stubs, dataset.id, "waiting")
    first.kill(signal.SIGKILL)
    stubs.wait_state(interrupted.id, {job_pb2.Job.STATE_RECOVERING})
    assert stubs.get_job(waiting.id).state == job_pb2.Job.STATE_QUEUED
    second = attach(stubs, interrupted.id, attempt=2)  # after the backoff, in the slot it kept
    assert second.pid != first.pid
    assert stubs.get_job(waiting.id).state == job_pb2.Job.STATE_QUEUED


def test_listing_sorts_searches_filters_exports_and_bulk_cancels(one_slot: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = one_slot
    dataset = stubs.upload_example()
    jobs = [
        create(stubs, dataset.id, name, description=text, labels={"team": team})
        for name, text, team in [
            ("charlie", "baseline run", "search"),
            ("alpha", "try rank 32 on the support data", "ads"),
            ("bravo", "baseline with more epochs", "search"),
        ]
    ]
    by_name = stubs.jobs.ListJobs(js.ListJobsRequest(order_by="name"))
    assert [j.name for j in by_name.jobs] == ["alpha", "bravo", "charlie"]
    page1 = stubs.jobs.ListJobs(js.ListJobsRequest(order_by="name desc", page_size=2))
    page2 = stubs.jobs.ListJobs(js.ListJobsRequest(order_by="name desc", page_size=2, page_token=page1.next_page_token))
    assert [j.name for j in [*page1.jobs, *page2.jobs]] == ["charlie", "bravo", "alpha"]
    baseline = stubs.jobs.ListJobs(js.ListJobsRequest(query="BASELINE"))
    assert {j.name for j in baseline.jobs} == {"charlie", "bravo"}
    search_team = stubs.jobs.ListJobs(js.ListJobsRequest(query="ads"))
    assert [j.name for j in search_team.jobs] == ["alpha"]
    mine = stubs.jobs.ListJobs(js.ListJobsRequest(filter='created_by = "ana@example.com" AND gpu_type = H100-80GB'))
    assert len(mine.jobs) == 3
    assert all(j.created_by == "ana@example.com" for j in mine.jobs)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.ListJobs(js.ListJobsRequest(order_by="colour"))
    assert details(caught.value)[1][0][0] == "order_by"

    text = b"".join(c.chunk for c in stubs.jobs.ExportJobs(js.ExportJobsRequest(order_by="name"))).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["name"] for r in rows] == ["alpha", "bravo", "charlie"]
    assert rows[0]["description"] == "try rank 32 on the support data"

    result = stubs.jobs.BulkCancelJobs(
        js.BulkCancelJobsRequest(
            filter='labels.team = "search"', job_ids=[jobs[1].id], reason=job_pb2.CANCEL_REASON_TESTING
        )
    )
    assert {r.job_id for r in result.results} == {j.id for j in jobs}
    assert all(not r.error for r in result.results)
    for job in jobs:  # the running one's worker is stopped within the grace period
        assert stubs.wait_state(job.id, TERMINAL).state == job_pb2.Job.STATE_CANCELLED
    # A filter that matches nothing cancels nothing: an empty answer, not an error.
    nothing = stubs.jobs.BulkCancelJobs(
        js.BulkCancelJobsRequest(filter='labels.team = "nobody"', reason=job_pb2.CANCEL_REASON_TESTING)
    )
    assert list(nothing.results) == []
    with pytest.raises(grpc.RpcError) as refused:  # neither ids nor a filter
        stubs.jobs.BulkCancelJobs(js.BulkCancelJobsRequest(reason=job_pb2.CANCEL_REASON_TESTING))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_switch_to_on_demand(stubs: Stubs) -> None:
    dataset = stubs.upload_example()
    job = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="/nonexistent/model"))
    assert job.cost.hourly_rate_usd == 2.49
    switched = stubs.jobs.SwitchToOnDemand(js.SwitchToOnDemandRequest(job_id=job.id))
    assert switched.compute.pricing_tier == job_pb2.PRICING_TIER_ON_DEMAND
    assert switched.cost.hourly_rate_usd == 7.99
    events = stubs.jobs.ListJobEvents(js.ListJobEventsRequest(job_id=job.id, query="PRICING_CHANGED")).events
    assert len(events) == 1


def test_cost_against_the_estimate_and_budget_alerts(scripted: tuple[ServerHandle, Stubs]) -> None:
    import sqlalchemy as sa

    handle, stubs = scripted
    dataset = stubs.upload_example()
    job = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="Qwen/Qwen2.5-0.5B"))
    low, high = job.cost.estimate_usd.low, job.cost.estimate_usd.high
    assert 0 < low <= high
    worker = attach(stubs, job.id)
    worker.stage(job_pb2.STAGE_TRAINING)
    engine = sa.create_engine(handle.database_url)

    def bill(usd: float) -> job_pb2.Job:
        # Stand in for hours of running: the budget check reads billed time.
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE jobs SET billed_seconds = :s WHERE id = :id"),
                {"s": usd / job.cost.hourly_rate_usd * 3600, "id": job.id},
            )
        worker.send([])  # any report runs the budget check
        return stubs.get_job(job.id)

    assert bill(0.5 * high).cost.alert == job_pb2.COST_ALERT_UNSPECIFIED
    warned = bill(0.9 * high)
    assert warned.cost.alert == job_pb2.COST_ALERT_WARNING
    assert 89 < warned.cost.percent_of_estimate < 95
    over = bill(1.2 * high)
    assert over.cost.alert == job_pb2.COST_ALERT_OVER_ESTIMATE
    assert over.cost.percent_of_estimate > 100
    bill(1.3 * high)
    engine.dispose()
    codes = [e.code for e in stubs.jobs.ListJobEvents(js.ListJobEventsRequest(job_id=job.id, page_size=1000)).events]
    assert codes.count("COST_WARNING") == 1
    assert codes.count("COST_OVER_ESTIMATE") == 1
    assert over.cost.training_usd == pytest.approx(over.cost.spend_usd)
    worker.kill(signal.SIGKILL)


def test_usage_quota_and_refusal_over_quota(tmp_path: Path, sleeper: Path) -> None:
    handle = start_server(tmp_path, trainer_python=str(sleeper), stop_grace_seconds=1.0, default_quota_gpu_hours=0.0003)
    stubs = stubs_for(handle)
    projects = project_service_pb2_grpc.ProjectServiceStub(stubs.channel)
    try:
        dataset = stubs.upload_example()
        job = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model"))
        attach(stubs, job.id)
        time.sleep(1.5)  # 1 s of billing is about 0.0003 GPU hours
        stubs.jobs.CancelJob(js.CancelJobRequest(job_id=job.id, reason=job_pb2.CANCEL_REASON_TESTING))
        stubs.wait_state(job.id, TERMINAL)
        usage = projects.GetUsage(ps.GetUsageRequest(months=3))
        assert usage.project == "default"
        assert usage.gpu_hours_used > 0.0003
        assert usage.gpu_hours_quota == pytest.approx(0.0003)
        assert usage.gpu_hours_remaining == 0
        assert usage.reset_time.ToDatetime().day == 1
        assert len(usage.months) == 3
        assert usage.months[0].jobs == 1
        assert usage.months[0].spend_usd > 0
        with pytest.raises(grpc.RpcError) as caught:
            stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model", force=True))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info, _ = details(caught.value)
        assert info.reason == "QUOTA_EXCEEDED"
        assert float(info.metadata["used_hours"]) > 0.0003
        assert info.metadata["reset_time"].startswith(usage.reset_time.ToDatetime().strftime("%Y-%m-01"))
    finally:
        stubs.channel.close()
        stop_server(handle)
