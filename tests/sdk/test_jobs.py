"""Jobs through the SDK against real servers (a stand-in trainer process where
the test does not need training): create, get, list and paging, wait, watch,
cancel, events and metrics history — sync and async."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from sdk_harness import RestartableServer

import brightrun
from brightrun import JobState


def _label() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def test_create_returns_a_typed_job(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    job = client.jobs.create(
        dataset=idle_dataset,
        base_model="some/model",
        force=True,
        preset="conservative",
        name="typed",
        gpu_type="A100-80GB",
        pricing="on_demand",
        max_duration=timedelta(hours=2),
        labels={"team": "nlp"},
        lora_rank=12,
        quantization="nf4",
        target_modules=["q_proj", "v_proj"],
        lr_scheduler="linear",
    )
    assert isinstance(job, brightrun.Job)
    assert job.id.startswith("job_")
    assert job.name == "typed"
    assert job.preset is brightrun.Preset.CONSERVATIVE
    assert job.custom
    cfg = job.config
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.epochs) == (12, 24, 2)
    assert cfg.quantization is brightrun.Quantization.NF4
    assert cfg.lr_scheduler is brightrun.LrScheduler.LINEAR
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert job.compute.gpu_type == "A100-80GB"
    assert job.compute.pricing_tier is brightrun.PricingTier.ON_DEMAND
    assert job.compute.max_duration == timedelta(hours=2)
    assert job.labels == {"team": "nlp"}
    assert job.create_time is not None
    assert job.create_time.tzinfo is not None
    assert job.raw.id == job.id
    fetched = client.jobs.get(job.id)
    assert fetched.id == job.id
    assert fetched.config == job.config


def test_list_pages_through_more_than_one_page(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    label = _label()
    created = [
        client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True, labels={"batch": label}).id
        for _ in range(7)
    ]
    query = f'labels.batch = "{label}"'
    pages = list(client.jobs.list(filter=query, page_size=3).iter_pages())
    assert [len(p) for p in pages] == [3, 3, 1]
    assert pages[-1].is_last
    assert all(p.next_page_token for p in pages[:-1])
    ids = [job.id for job in client.jobs.list(filter=query, page_size=3)]
    assert ids == list(reversed(created))  # newest first, every job once
    assert [j.id for j in client.jobs.list(filter=query, page_size=2, limit=5)] == ids[:5]
    assert client.jobs.list(filter=query, page_size=3).first() is not None
    resumed = client.jobs.list(filter=query, page_size=3, page_token=pages[0].next_page_token)
    assert [j.id for j in resumed] == ids[3:]


async def test_async_list_pages(aclient: brightrun.AsyncClient, idle_dataset: brightrun.Dataset) -> None:
    label = _label()
    created = [
        (
            await aclient.jobs.create(
                dataset=idle_dataset, base_model="some/model", force=True, labels={"batch": label}
            )
        ).id
        for _ in range(5)
    ]
    query = f'labels.batch = "{label}"'
    pages = [page async for page in aclient.jobs.list(filter=query, page_size=2).iter_pages()]
    assert [len(p) for p in pages] == [2, 2, 1]
    ids = [job.id async for job in aclient.jobs.list(filter=query, page_size=2)]
    assert ids == list(reversed(created))
    assert [j.id for j in await aclient.jobs.list(filter=query).to_list()] == ids
    first = await aclient.jobs.list(filter=query, page_size=2).first()
    assert first is not None
    assert first.id == ids[0]


def test_state_filter(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    job = client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True, labels={"batch": _label()})
    job.wait(timeout=60)
    failed = client.jobs.list(state="failed", filter=f'labels.batch = "{job.labels["batch"]}"').to_list()
    assert [j.id for j in failed] == [job.id]
    assert all(j.state is JobState.FAILED for j in client.jobs.list(state=JobState.FAILED, limit=20))


def test_wait_returns_a_failed_job_and_raise_for_status_raises(
    client: brightrun.Client, idle_dataset: brightrun.Dataset
) -> None:
    job = client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True)
    returned = job.wait(timeout=60)
    assert returned is job
    assert job.state is JobState.FAILED
    assert job.failure is not None
    assert job.end_time is not None
    with pytest.raises(brightrun.JobFailedError) as info:
        job.raise_for_status()
    assert info.value.job is job
    assert info.value.failure is job.failure
    assert job.id in str(info.value)
    # Events were recorded in order, one per sequence number.
    events = job.events().to_list()
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].code == "JOB_CREATED"
    assert job.events("job_created").to_list() == events[:1]
    streamed = list(job.stream_events())
    assert streamed == events
    status_only = list(job.stream_events(types=["status"]))
    assert status_only == [e for e in events if e.type is brightrun.EventType.STATUS]
    assert job.metrics().to_list() == []
    assert list(job.stream_metrics()) == []


def test_watch_yields_snapshots_until_terminal(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    job = client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True)
    snapshots = list(job.watch(timeout=60))
    versions = [s.version for s in snapshots]
    assert versions == sorted(set(versions))
    assert snapshots[-1].is_terminal
    assert not any(s.is_terminal for s in snapshots[:-1])
    assert job.state is snapshots[-1].state  # the handle follows along


def test_wait_times_out(stuck_server: RestartableServer, chat_file: object) -> None:
    with brightrun.Client(stuck_server.address) as c:
        ds = c.datasets.upload(str(chat_file))
        job = c.jobs.create(dataset=ds, base_model="some/model", force=True)
        start = time.monotonic()
        with pytest.raises(brightrun.WaitTimeout) as info:
            job.wait(timeout=1.5)
        assert 1.4 < time.monotonic() - start < 5
        assert isinstance(info.value, TimeoutError)
        assert info.value.job is job
        assert not job.is_terminal
        with pytest.raises(brightrun.WaitTimeout):
            job.wait(timeout=0)


def test_cancel_queued_and_running_jobs(stuck_server: RestartableServer, chat_file: object) -> None:
    with brightrun.Client(stuck_server.address) as c:
        ds = c.datasets.upload(str(chat_file))
        running = c.jobs.create(dataset=ds, base_model="some/model", force=True)
        for _ in running.watch(timeout=30):
            if running.state is JobState.PROVISIONING:
                break
        queued = c.jobs.create(dataset=ds, base_model="some/model", force=True)
        assert queued.state is JobState.QUEUED
        queued.cancel(reason="testing", note="not needed")
        assert queued.state is JobState.CANCELLED
        assert queued.cancellation is not None
        assert queued.cancellation.reason is brightrun.CancelReason.TESTING
        assert queued.cancellation.note == "not needed"
        with pytest.raises(brightrun.JobCancelledError, match="testing"):
            queued.raise_for_status()

        cancelled = c.jobs.cancel(running.id, reason=brightrun.CancelReason.WRONG_CONFIGURATION)
        assert cancelled.state in (JobState.CANCELLING, JobState.CANCELLED)
        assert cancelled.wait(timeout=60).state is JobState.CANCELLED
        # Cancelling again is harmless (the SDK may retry it).
        assert c.jobs.cancel(running.id, reason="testing").state is JobState.CANCELLED


async def test_async_job_handle(stuck_server: RestartableServer, chat_file: object) -> None:
    async with brightrun.AsyncClient(stuck_server.address) as c:
        ds = await c.datasets.upload(str(chat_file))
        job = await c.jobs.create(dataset=ds, base_model="some/model", force=True)
        assert isinstance(job, brightrun.AsyncJob)
        with pytest.raises(brightrun.WaitTimeout):
            await job.wait(timeout=0.5)
        await job.cancel(reason="client_request")
        seen = [snapshot.state async for snapshot in job.watch(timeout=60)]
        assert seen[-1] is JobState.CANCELLED
        assert (await job.reload()).state is JobState.CANCELLED
        events = [e async for e in job.stream_events()]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert [e async for e in job.events()] == events
        assert any(e.code == "CANCEL_REQUESTED" for e in events)
        assert [m async for m in job.stream_metrics()] == []
        final = await c.jobs.wait(job.id, timeout=5)
        assert final.state is JobState.CANCELLED


def test_estimate_and_oom_acknowledgement(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    risky = {"base_model": "meta-llama/Llama-3.1-8B", "gpu_type": "A10G-24GB", "batch_size": 8}
    estimate = client.jobs.estimate(dataset=idle_dataset, **risky)
    assert isinstance(estimate, brightrun.JobEstimate)
    assert estimate.oom_risk is brightrun.OomRisk.HIGH
    assert not estimate.fits
    assert estimate.total_bytes == sum(m.bytes for m in estimate.memory)
    assert estimate.fixes
    assert all(isinstance(f.config_changes, brightrun.TrainingConfig) for f in estimate.fixes)
    assert estimate.duration is not None
    assert estimate.cost_spot is not None
    assert estimate.cost_spot.pricing_tier is brightrun.PricingTier.SPOT

    with pytest.raises(brightrun.FailedPreconditionError) as info:
        client.jobs.create(dataset=idle_dataset, **risky)
    assert info.value.reason == "OOM_RISK_HIGH"
    job = client.jobs.create(dataset=idle_dataset, acknowledge_oom_risk=True, **risky)
    assert job.estimate is not None
    assert job.estimate.oom_risk is brightrun.OomRisk.HIGH

    with pytest.raises(brightrun.InvalidArgumentError) as unknown:
        client.jobs.estimate(base_model="nope/nope")
    assert unknown.value.reason == "MODEL_UNKNOWN"


async def test_async_estimate(aclient: brightrun.AsyncClient) -> None:
    estimate = await aclient.jobs.estimate(base_model="meta-llama/Llama-3.2-1B", quantization="nf4")
    assert estimate.oom_risk is brightrun.OomRisk.LOW
    assert estimate.duration is None  # no dataset, no duration


def test_double_start_guard_description_query_and_order(stuck_server: RestartableServer, chat_file: object) -> None:
    with brightrun.Client(stuck_server.address) as c:
        ds = c.datasets.upload(str(chat_file))
        first = c.jobs.create(dataset=ds, base_model="some/model", description="baseline for the guard test")
        assert first.description == "baseline for the guard test"
        with pytest.raises(brightrun.AlreadyExistsError) as info:
            c.jobs.create(dataset=ds, base_model="some/model")
        assert info.value.reason == "DUPLICATE_JOB"
        assert first.id in str(info.value)
        second = c.jobs.create(dataset=ds, base_model="some/model", force=True, name="zzz forced")
        assert second.id != first.id
        assert [j.id for j in c.jobs.list(query="guard test")] == [first.id]
        by_name = [j.name for j in c.jobs.list(order_by="name desc")]
        assert by_name == sorted(by_name, reverse=True)
