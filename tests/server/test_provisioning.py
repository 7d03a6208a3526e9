"""Provisioning through the simulated spot market: outcomes, retries with
visible progress, escalation choices, on-demand, and spot interruptions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brightrun.v1 import job_pb2, queue_service_pb2_grpc
from brightrun.v1 import job_service_pb2 as js
from brightrun.v1 import queue_service_pb2 as qs
from brightrun_server.executors.providers import MarketConfig, Outcome
from tests.conftest import ServerHandle, start_server, stop_server
from tests.server.conftest import Stubs, attach, stubs_for

NO_FAILURES: dict[Outcome, float] = {}


def cloud(tmp_path: Path, sleeper: Path, **market: Any) -> tuple[ServerHandle, Stubs]:
    config = MarketConfig(
        provisioning_delay_seconds=(0.0, 0.05), failure_rates=NO_FAILURES, interruptions_per_hour=0, **market
    )
    handle = start_server(
        tmp_path,
        trainer_python=str(sleeper),
        stop_grace_seconds=0.5,
        simulated_cloud=config,
        provisioning_retry_seconds=0.2,
        provisioning_max_attempts=3,
        initial_backoff_seconds=0.1,
    )
    return handle, stubs_for(handle)


@pytest.fixture
def no_spot(tmp_path: Path, sleeper: Path) -> Iterator[tuple[ServerHandle, Stubs]]:
    handle, stubs = cloud(tmp_path, sleeper, availability=[(0.0, 0.0)])
    yield handle, stubs
    stubs.channel.close()
    stop_server(handle)


def events(stubs: Stubs, job_id: str, code: str) -> list[Any]:
    page = stubs.jobs.ListJobEvents(js.ListJobEventsRequest(job_id=job_id, page_size=1000))
    return [e for e in page.events if e.code == code]


def test_no_spot_capacity_retries_visibly_then_offers_choices(no_spot: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = no_spot
    dataset = stubs.upload_example()
    job = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model"))
    assert any("spot availability" in w and "0%" in w for w in job.warnings)
    assert len(events(stubs, job.id, "CAPACITY_WARNING")) == 1
    seen_attempts = set()
    deadline = time.monotonic() + 30
    while (current := stubs.get_job(job.id)).state != job_pb2.Job.STATE_AWAITING_DECISION:
        assert time.monotonic() < deadline, current
        if current.provisioning.attempt:
            seen_attempts.add(current.provisioning.attempt)
            assert current.provisioning.max_attempts == 3
            assert current.provisioning.last_outcome == job_pb2.PROVISIONING_OUTCOME_SPOT_UNAVAILABLE
            assert current.provisioning.pool == "simulated-cloud"
        time.sleep(0.02)
    assert seen_attempts & {1, 2}, "progress is visible between tries"
    assert current.attempt_count == 0, "a failed provisioning starts nothing"
    assert current.cost.billed_seconds == 0, "and bills nothing"
    assert set(current.decision.choices) == {
        job_pb2.RECOVERY_CHOICE_EXTEND,
        job_pb2.RECOVERY_CHOICE_SWITCH_TO_ON_DEMAND,
        job_pb2.RECOVERY_CHOICE_CANCEL,
    }
    assert "3 provisioning attempts" in current.decision.reason
    assert len(events(stubs, job.id, "PROVISIONING_FAILED")) == 2
    assert len(events(stubs, job.id, "PROVISIONING_ESCALATED")) == 1
    queue = queue_service_pb2_grpc.QueueServiceStub(stubs.channel)
    pools = {p.name: p for p in queue.GetQueue(qs.GetQueueRequest()).pools}
    assert pools["simulated-cloud"].spot_availability == 0.0

    switched = stubs.jobs.DecideRecovery(
        js.DecideRecoveryRequest(job_id=job.id, choice=job_pb2.RECOVERY_CHOICE_SWITCH_TO_ON_DEMAND)
    )
    assert switched.compute.pricing_tier == job_pb2.PRICING_TIER_ON_DEMAND
    worker = attach(stubs, job.id)  # on-demand capacity is available: the worker starts
    started = stubs.wait_state(job.id, {job_pb2.Job.STATE_PROVISIONING})
    assert started.provisioning.last_outcome == job_pb2.PROVISIONING_OUTCOME_PROVISIONED
    worker.kill(9)


def test_extend_and_cancel_while_waiting_for_capacity(no_spot: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = no_spot
    dataset = stubs.upload_example()
    job = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model"))
    stubs.wait_state(job.id, {job_pb2.Job.STATE_AWAITING_DECISION})
    extended = stubs.jobs.DecideRecovery(js.DecideRecoveryRequest(job_id=job.id, choice=job_pb2.RECOVERY_CHOICE_EXTEND))
    assert extended.state in (job_pb2.Job.STATE_QUEUED, job_pb2.Job.STATE_PROVISIONING)
    retrying = stubs.wait_state(job.id, {job_pb2.Job.STATE_PROVISIONING})
    assert retrying.provisioning.attempt <= 3
    cancelled = stubs.jobs.CancelJob(js.CancelJobRequest(job_id=job.id, reason=job_pb2.CANCEL_REASON_COST_TOO_HIGH))
    final = stubs.wait_state(job.id, {job_pb2.Job.STATE_CANCELLED})
    assert cancelled.state in (job_pb2.Job.STATE_CANCELLED, job_pb2.Job.STATE_CANCELLING)
    assert final.attempt_count == 0


def test_switching_to_on_demand_mid_retry_provisions_next_try(no_spot: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = no_spot
    dataset = stubs.upload_example()
    job = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model"))
    deadline = time.monotonic() + 20
    while stubs.get_job(job.id).provisioning.attempt < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stubs.jobs.SwitchToOnDemand(js.SwitchToOnDemandRequest(job_id=job.id))
    attach(stubs, job.id).kill(9)


def test_spot_workers_are_interrupted_and_recovered(tmp_path: Path, sleeper: Path) -> None:
    # Mean time to interruption ~0.2 s, notice 0.3 s (the scripted worker, like a
    # stuck trainer, ignores SIGTERM, so SIGKILL ends it).
    handle, stubs = cloud(tmp_path, sleeper, availability=[(0.0, 1.0)])
    handle.run(_set_hazard(handle, per_hour=18_000, notice=0.3))
    try:
        dataset = stubs.upload_example()
        job = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model"))
        attach(stubs, job.id)
        interrupted = stubs.wait_state(job.id, {job_pb2.Job.STATE_RECOVERING, job_pb2.Job.STATE_AWAITING_DECISION})
        assert interrupted.interruptions[0].failure_class in (
            job_pb2.FAILURE_CLASS_WORKER_LOST,
            job_pb2.FAILURE_CLASS_SPOT_INTERRUPTION,
        )
    finally:
        stubs.channel.close()
        stop_server(handle)


async def _set_hazard(handle: ServerHandle, *, per_hour: float, notice: float) -> None:
    market = handle.app.scheduler.providers["simulated-cloud"]
    market.config = market.config.model_copy(update={"interruptions_per_hour": per_hour, "notice_seconds": notice})


def test_market_outcomes_follow_the_configuration() -> None:
    import asyncio

    from brightrun_server.executors.providers import SimulatedCloud

    rates = {Outcome.TIMEOUT: 0.1, Outcome.RATE_LIMITED: 0.1, Outcome.DATACENTER_UNAVAILABLE: 0.1}
    market = SimulatedCloud(
        MarketConfig(availability=[(0.0, 0.5)], provisioning_delay_seconds=(0, 0), failure_rates=rates, seed=7)
    )

    async def sample(n: int, spot: bool) -> dict[Outcome, int]:
        counts: dict[Outcome, int] = {}
        for _ in range(n):
            outcome = await market.provision("H100-80GB", spot)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    spot = asyncio.run(sample(4000, True))
    on_demand = asyncio.run(sample(4000, False))
    for outcome in rates:
        assert 0.07 < spot[outcome] / 4000 < 0.13
        assert 0.07 < on_demand[outcome] / 4000 < 0.13
    # 70 % pass the failure rolls; half of those find spot capacity.
    assert 0.31 < spot[Outcome.SPOT_UNAVAILABLE] / 4000 < 0.39
    assert Outcome.SPOT_UNAVAILABLE not in on_demand
    assert 0.31 < spot[Outcome.PROVISIONED] / 4000 < 0.39
    with pytest.raises(ValueError, match="availability"):
        MarketConfig(availability=[(0.0, 1.5)])
