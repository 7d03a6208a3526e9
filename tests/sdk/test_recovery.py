"""Failures and recovery through the SDK against a real server whose trainer
the test plays (``sdk_harness.Trainer``): pause and resume, suggested fixes and
retries, failure reports, checkpoints and continuations, decisions and what
``wait()`` does while a job awaits one — sync and async."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sdk_harness import Failure, FlakyProxy, RestartableServer, Trainer, wait_for

import brightrun
from brightrun import FailureClass, JobState, PricingTier, RecoveryChoice
from brightrun.v1 import trainer_service_pb2

MODEL = "scripted/model"
NO_RETRIES = brightrun.RecoveryPolicy(max_system_retries=0)


@pytest.fixture(scope="module")
def address(scripted_server: RestartableServer) -> str:
    return scripted_server.address


@pytest.fixture(scope="module")
def dataset(address: str, chat_file: Path) -> brightrun.Dataset:
    with brightrun.Client(address) as c:
        return c.datasets.upload(chat_file, name="scripted-chat")


@pytest.fixture
def client(address: str) -> Iterator[brightrun.Client]:
    with brightrun.Client(address) as c:
        yield c


@pytest.fixture
def trainers(address: str) -> Iterator[list[Trainer]]:
    """Trainers a test attached. Afterwards every unfinished job on the server
    is cancelled (so no worker holds a slot for the next test) and the
    sleeping trainer processes are killed."""
    attached: list[Trainer] = []
    yield attached
    with brightrun.Client(address) as c:
        for job in c.jobs.list(page_size=200):
            if not job.is_terminal and job.state is not JobState.CANCELLING:
                with contextlib.suppress(brightrun.ApiError):
                    job.cancel(reason="testing")
    for trainer in attached:
        trainer.close()


_SEEDS = itertools.count(1000)


def start(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer], **fields: object
) -> tuple[brightrun.Job, Trainer]:
    """A job on its own seed (so retries never meet another test's job in the
    double-start guard), with its first attempt's trainer."""
    fields.setdefault("seed", next(_SEEDS))
    fields.setdefault("base_model", MODEL)
    job = client.jobs.create(dataset=dataset, force=True, **fields)  # type: ignore[arg-type]
    trainer = Trainer(client.target, job.id)
    trainers.append(trainer)
    return job, trainer


def out_of_memory(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer], **fields: object
) -> brightrun.Job:
    """A job that trained 3 steps, checkpointed at step 2 and ran out of memory."""
    job, trainer = start(client, dataset, trainers, **fields)
    trainer.to_training()
    trainer.steps(1, 3)
    trainer.checkpoint(2)
    trainer.fail("OutOfMemoryError", "CUDA out of memory. Tried to allocate 1.50 GiB", step=3)
    job.wait(timeout=30)
    assert job.state is JobState.FAILED
    return job


def awaiting_decision(client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]) -> brightrun.Job:
    """A job whose worker died with no automatic retry allowed: it awaits a decision."""
    job, trainer = start(client, dataset, trainers, recovery_policy=NO_RETRIES)
    trainer.kill()
    wait_for(lambda: job.reload().state is JobState.AWAITING_DECISION, timeout=30)
    return job


# ---------------------------------------------------------------- pause and resume


def test_pause_waits_through_pausing_and_paused_then_resume_elsewhere(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    job, trainer = start(client, dataset, trainers)
    with pytest.raises(brightrun.FailedPreconditionError) as refused:
        job.pause()  # still provisioning: only a training job pauses
    assert refused.value.reason == "JOB_STATE_CONFLICT"
    trainer.to_training()
    trainer.steps(1, 5)
    assert job.pause() is job
    assert job.state is JobState.PAUSING
    assert client.jobs.pause(job.id).state in (JobState.PAUSING, JobState.PAUSED), "pausing again is a no-op"
    assert trainer.directive() == trainer_service_pb2.DIRECTIVE_STOP
    trainer.checkpoint(5)
    trainer.stopped(5)
    wait_for(lambda: job.reload().state is JobState.PAUSED)
    with pytest.raises(brightrun.WaitTimeout) as timed_out:
        job.wait(timeout=0.5)  # a paused job is not over: wait keeps waiting
    assert timed_out.value.job is not None
    assert timed_out.value.job.state is JobState.PAUSED

    resumed = job.resume(gpu_type="a100-80gb", pricing="on_demand")
    assert resumed is job
    assert job.state in (JobState.QUEUED, JobState.PROVISIONING)
    assert (job.compute.gpu_type, job.compute.pricing_tier) == ("A100-80GB", PricingTier.ON_DEMAND)
    assert job.paused_duration is not None
    assert job.paused_duration > timedelta(0)


def test_a_resume_whose_answer_was_lost_is_retried_and_still_succeeds(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    job, trainer = start(client, dataset, trainers)
    trainer.to_training()
    job.pause()
    trainer.checkpoint(1)
    trainer.stopped(1)
    wait_for(lambda: job.reload().state is JobState.PAUSED)
    proxy = FlakyProxy(client.target)
    try:
        proxy.fail("ResumeJob", Failure(after_forward=True))  # resumed, but the answer is lost
        with brightrun.Client(proxy.address) as flaky:
            resumed = flaky.jobs.resume(job.id)
        assert proxy.attempts("ResumeJob") == 2
        assert resumed.state in (JobState.QUEUED, JobState.PROVISIONING)
    finally:
        proxy.close()


# ---------------------------------------------------------------- fixes, retries, reports


def test_out_of_memory_fixes_report_and_a_retry_with_the_top_fix(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    failed = out_of_memory(client, dataset, trainers, batch_size=8, max_seq_length=2048)
    fixes = failed.suggest_fixes()
    assert isinstance(fixes, brightrun.FixSuggestions)
    assert fixes.failure_class is FailureClass.OUT_OF_MEMORY
    top = fixes[0]
    assert isinstance(top, brightrun.RecoveryFix)
    assert top.id == "reduce_batch_size"
    assert top.title
    assert top.description
    assert (top.config_changes.batch_size, top.config_changes.gradient_accumulation_steps) == (4, 2)
    assert top.changes() == {"batch_size": 4, "gradient_accumulation_steps": 2}
    assert top.confidence.experimental  # fewer than 20 recorded outcomes (other tests' retries count too)
    assert top.confidence.outcomes < 20
    assert 0.0 <= top.confidence.success_rate <= 1.0
    assert "experimental" in str(top.confidence)
    assert isinstance(top.incompatible_with, tuple)
    assert all(f.applicable for f in fixes)
    assert fixes.top == top
    assert fixes.get("quantize_4bit") is not None
    assert fixes.get("no_such_fix") is None

    report = failed.failure_report()
    assert isinstance(report, brightrun.FailureReport)
    assert report.job_id == failed.id
    assert report.failure is not None
    assert report.failure.failure_class is FailureClass.OUT_OF_MEMORY
    assert report.last_completed_step == 3
    assert [c.step for c in report.checkpoints] == [2]
    assert report.partial_outputs.metric_points == 3
    assert report.partial_outputs.last_train_loss == pytest.approx(0.5)
    assert report.actual.attempts == 1
    kinds = [a.kind for a in report.actions]
    assert kinds[0] == "retry_with_fix"
    assert "resume_from_checkpoint" in kinds
    assert {a.rpc for a in report.actions} >= {"RetryJob", "ResumeFromCheckpoint"}

    retry = failed.retry_with_suggested_fix()
    assert isinstance(retry, brightrun.Job)
    assert retry.id != failed.id
    assert retry.name == f"{failed.name} (Retry #1)"
    assert (retry.config.batch_size, retry.config.gradient_accumulation_steps) == (4, 2)
    assert retry.lineage is not None
    assert (retry.lineage.retry_of, retry.lineage.retry_number) == (failed.id, 1)
    assert retry.lineage.applied_fixes == ("reduce_batch_size",)

    # Fixes by object and by id combine; the same configuration is a plain retry.
    combined = failed.retry(fixes=[fixes.get("quantize_4bit"), "gradient_checkpointing"])  # type: ignore[list-item]
    assert combined.config.quantization is brightrun.Quantization.NF4
    assert combined.config.gradient_checkpointing
    assert combined.lineage is not None
    assert combined.lineage.retry_number == 2
    with pytest.raises(brightrun.InvalidArgumentError) as unknown:
        failed.retry(fixes="no_such_fix")
    assert "unknown fix 'no_such_fix'" in str(unknown.value)
    with pytest.raises(TypeError, match="a fix is a fix id or a RecoveryFix"):
        failed.retry(fixes=[3])  # type: ignore[list-item]
    results = client.jobs.bulk_cancel([retry, combined], reason="testing")
    assert [(r.job_id, r.ok) for r in results] == [(retry.id, True), (combined.id, True)]


def test_retry_sends_one_request_id_on_every_attempt(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    failed = out_of_memory(client, dataset, trainers, batch_size=8)
    proxy = FlakyProxy(client.target)
    try:
        proxy.fail("RetryJob", Failure(), Failure())  # refused twice before reaching the server
        with brightrun.Client(proxy.address) as flaky:
            retry = flaky.jobs.get(failed.id).retry_with_suggested_fix()
        requests = proxy.requests["RetryJob"]
    finally:
        proxy.close()
    assert len(requests) == 3
    assert requests[0].request_id
    assert {r.request_id for r in requests} == {requests[0].request_id}
    assert [list(r.fix_ids) for r in requests] == [["reduce_batch_size"]] * 3
    assert retry.lineage is not None
    assert retry.lineage.retry_number == 1
    mine = failed.retry(request_id="my-retry-key")
    assert mine.request_id == "my-retry-key"
    assert mine.lineage is not None
    assert mine.lineage.applied_fixes == ("retry_same_config",)


def test_a_retry_whose_answer_was_lost_returns_the_job_it_created(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    failed = out_of_memory(client, dataset, trainers, batch_size=8)
    proxy = FlakyProxy(client.target)
    try:
        proxy.fail("RetryJob", Failure(after_forward=True))  # the retry is created, the answer lost
        with brightrun.Client(proxy.address) as flaky:
            retry = flaky.jobs.retry(failed.id, fixes="reduce_batch_size")
    finally:
        proxy.close()
    assert retry.lineage is not None
    assert retry.lineage.retry_number == 1
    again = failed.retry()
    assert again.lineage is not None
    assert again.lineage.retry_number == 2, "the lost answer's retry was the only one created"


def test_a_retry_like_a_running_one_is_refused_unless_forced(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    failed = out_of_memory(client, dataset, trainers, batch_size=8)
    fixed = failed.retry_with_suggested_fix()  # queued: it trains this configuration and has not finished
    with pytest.raises(brightrun.AlreadyExistsError) as duplicate:
        failed.retry_with_suggested_fix()
    assert (duplicate.value.reason, duplicate.value.metadata["job_id"]) == ("DUPLICATE_JOB", fixed.id)
    forced = failed.retry_with_suggested_fix(force=True)
    assert forced.lineage is not None
    assert (forced.lineage.retry_number, forced.lineage.applied_fixes) == (2, ("reduce_batch_size",))
    same = failed.retry()
    with pytest.raises(brightrun.AlreadyExistsError):
        client.jobs.retry(failed.id)
    again = client.jobs.retry(failed.id, force=True)
    assert again.config == same.config
    assert again.id != same.id


def test_a_continuation_like_a_running_one_is_refused_unless_forced(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    failed = out_of_memory(client, dataset, trainers, batch_size=8)
    first = failed.resume_from_checkpoint(batch_size=4)
    with pytest.raises(brightrun.AlreadyExistsError) as duplicate:
        failed.resume_from_checkpoint(batch_size=4)
    assert (duplicate.value.reason, duplicate.value.metadata["job_id"]) == ("DUPLICATE_JOB", first.id)
    forced = failed.resume_from_checkpoint(batch_size=4, force=True)
    by_id = client.jobs.resume_from_checkpoint(failed.id, batch_size=4, force=True)
    assert len({first.id, forced.id, by_id.id}) == 3
    assert forced.lineage is not None
    assert forced.lineage.resumed_from_job_id == failed.id
    assert forced.config.batch_size == 4


async def test_async_retry_and_continuation_take_force(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    failed = out_of_memory(client, dataset, trainers, batch_size=8)
    async with brightrun.AsyncClient(client.target) as aclient:
        job = await aclient.jobs.get(failed.id)
        first = await job.retry()
        with pytest.raises(brightrun.AlreadyExistsError):
            await job.retry()
        assert (await job.retry(force=True)).id != first.id
        assert (await aclient.jobs.retry(failed.id, force=True)).id != first.id
        fixed = await job.retry_with_suggested_fix()
        with pytest.raises(brightrun.AlreadyExistsError):
            await aclient.jobs.retry_with_suggested_fix(failed.id)
        assert (await aclient.jobs.retry_with_suggested_fix(failed.id, force=True)).id != fixed.id
        continuation = await job.resume_from_checkpoint(batch_size=2)
        with pytest.raises(brightrun.AlreadyExistsError):
            await aclient.jobs.resume_from_checkpoint(failed.id, batch_size=2)
        assert (await job.resume_from_checkpoint(batch_size=2, force=True)).id != continuation.id
        assert (await aclient.jobs.resume_from_checkpoint(failed.id, batch_size=2, force=True)).id != continuation.id


def test_a_dataset_error_has_no_applicable_fix(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    job, trainer = start(client, dataset, trainers)
    trainer.attempt.stage(2)  # preprocessing
    trainer.fail(
        "DatasetFormatError",
        "conversations[3].messages[1]: every target token is truncated at max_seq_length 512",
        stage=2,
    )
    job.wait(timeout=30)
    assert job.failure is not None
    assert job.failure.failure_class is FailureClass.DATASET_FORMAT
    fixes = job.suggest_fixes()
    assert [f.id for f in fixes] == ["fix_dataset"]
    assert not fixes[0].applicable
    assert fixes.top is None
    with pytest.raises(brightrun.NoApplicableFixError) as caught:
        job.retry_with_suggested_fix()
    error = caught.value
    assert error.failure_class is FailureClass.DATASET_FORMAT
    assert [f.id for f in error.fixes] == ["fix_dataset"]
    assert error.job.id == job.id
    assert "brightrun datasets validate" in str(error)
    with pytest.raises(brightrun.FailedPreconditionError) as refused:
        job.retry_with_suggested_fix("fix_dataset")  # the server stays authoritative
    assert refused.value.reason == "FIX_NOT_APPLICABLE"
    assert [a.kind for a in job.failure_report().actions] == ["fix_dataset"]


def test_a_fix_summary_states_the_saving_plainly(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    failed = out_of_memory(client, dataset, trainers, base_model="Qwen/Qwen2.5-0.5B", batch_size=8)
    top = failed.suggest_fixes()[0]
    assert top.effect.memory_bytes is not None  # the estimator knows this model
    assert "less)" in top.effect.summary
    assert "+" not in top.effect.summary


# ---------------------------------------------------------------- checkpoints and continuations


def test_resume_from_checkpoint_checks_changes_then_creates_a_continuation(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    failed = out_of_memory(client, dataset, trainers, batch_size=8)
    (checkpoint,) = failed.checkpoints()
    assert isinstance(checkpoint, brightrun.Checkpoint)
    assert checkpoint.step == 2
    assert checkpoint.id.startswith("ckpt_")
    assert client.jobs.list_checkpoints(failed.id) == [checkpoint]

    with pytest.raises(TypeError, match="'lora_rank' is locked on resume"):
        failed.resume_from_checkpoint(lora_rank=8)
    with pytest.raises(TypeError, match=r"cannot change 'lora_dropout' \(a continuation keeps it\)"):
        failed.resume_from_checkpoint(lora_dropout=0.1)
    with pytest.raises(TypeError, match="did you mean 'batch_size'"):
        failed.resume_from_checkpoint(batch_sise=4)
    with pytest.raises(ValueError, match="unknown LrScheduleMode"):
        failed.resume_from_checkpoint(lr_schedule="sideways")
    with pytest.raises(brightrun.InvalidArgumentError) as too_long:
        failed.resume_from_checkpoint(epochs=9)  # allowed field, but above the original: the server says no
    assert [v.field for v in too_long.value.field_violations] == ["changes.epochs"]
    with pytest.raises(brightrun.NotFoundError):
        failed.resume_from_checkpoint("ckpt_missing")

    continuation = failed.resume_from_checkpoint(
        checkpoint, batch_size=4, gradient_accumulation_steps=2, lr_schedule="restart_warmup", pricing="on_demand"
    )
    assert continuation.id != failed.id
    assert continuation.lineage is not None
    assert continuation.lineage.resumed_from_job_id == failed.id
    assert continuation.lineage.resumed_from_checkpoint_id == checkpoint.id
    assert (continuation.config.batch_size, continuation.config.lora_rank) == (4, failed.config.lora_rank)
    assert continuation.compute.pricing_tier is PricingTier.ON_DEMAND
    continuation.cancel(reason="testing")


# ---------------------------------------------------------------- decisions


def test_wait_raises_job_needs_decision_and_decide_answers_it(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    job = awaiting_decision(client, dataset, trainers)
    with pytest.raises(brightrun.JobNeedsDecision) as caught:
        client.jobs.get(job.id).wait(timeout=30)
    needs = caught.value
    assert isinstance(needs, brightrun.JobError)
    assert needs.job.state is JobState.AWAITING_DECISION
    assert set(needs.choices) == {
        RecoveryChoice.KEEP_TRYING,
        RecoveryChoice.SWITCH_TO_ON_DEMAND,
        RecoveryChoice.CANCEL,
    }
    assert "automatic recoveries in a row failed" in needs.reason
    assert "job.decide" in str(needs)
    assert job.wait(on_decision="return") is job
    assert job.state is JobState.AWAITING_DECISION
    with pytest.raises(brightrun.WaitTimeout):
        job.wait(timeout=0.5, on_decision="wait")
    with pytest.raises(ValueError, match="on_decision must be one of"):
        job.wait(on_decision="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a choice is required"):
        job.decide("unspecified")

    assert job.decide("switch_to_on_demand") is job
    assert job.state in (JobState.RECOVERING, JobState.PROVISIONING)
    assert job.compute.pricing_tier is PricingTier.ON_DEMAND
    second = Trainer(client.target, job.id, attempt=2)
    trainers.append(second)
    second.kill()  # fails again: back to a decision, now without the on-demand choice
    with pytest.raises(brightrun.JobNeedsDecision) as again:
        job.wait(timeout=30)
    assert set(again.value.choices) == {RecoveryChoice.KEEP_TRYING, RecoveryChoice.CANCEL}

    proxy = FlakyProxy(client.target)
    try:
        proxy.fail("DecideRecovery", Failure(after_forward=True))  # decided, but the answer is lost
        with brightrun.Client(proxy.address) as flaky:
            decided = flaky.jobs.decide(job.id, RecoveryChoice.CANCEL)
        assert proxy.attempts("DecideRecovery") == 2
    finally:
        proxy.close()
    assert decided.state is JobState.CANCELLED
    assert job.wait(timeout=10).state is JobState.CANCELLED
    with pytest.raises(brightrun.FailedPreconditionError):
        job.decide("keep_trying")


def test_wait_keeps_waiting_through_recovery(
    client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]
) -> None:
    """A job RECOVERING is handled by the server: wait() does not stop there."""
    job, trainer = start(client, dataset, trainers)
    trainer.to_training()
    trainer.kill()  # worker lost: automatic recovery
    states: list[JobState] = []

    def second_attempt() -> None:
        nxt = Trainer(client.target, job.id, attempt=2)
        trainers.append(nxt)
        nxt.to_training()
        nxt.steps(1, 2)  # a training step: the interruption is recovered
        nxt.fail("ValueError", "loss is nan", step=2)  # divergence: not retried, the job fails

    thread = threading.Thread(target=second_attempt)
    thread.start()
    for snapshot in job.watch(timeout=30):
        states.append(snapshot.state)
    thread.join(30)
    assert JobState.RECOVERING in states
    assert job.wait(timeout=5).state is JobState.FAILED
    assert job.interruptions
    assert job.interruptions[0].failure_class is FailureClass.WORKER_LOST
    assert job.interruptions[0].recovered


def test_switch_to_on_demand(client: brightrun.Client, dataset: brightrun.Dataset, trainers: list[Trainer]) -> None:
    job, _ = start(client, dataset, trainers)
    assert job.cost.hourly_rate_usd == 2.49
    assert job.switch_to_on_demand() is job
    assert job.compute.pricing_tier is PricingTier.ON_DEMAND
    assert job.cost.hourly_rate_usd == 7.99
    assert client.jobs.switch_to_on_demand(job.id).compute.pricing_tier is PricingTier.ON_DEMAND
    job.cancel(reason="testing")
    job.wait(timeout=10)
    with pytest.raises(brightrun.FailedPreconditionError):
        job.switch_to_on_demand()


# ---------------------------------------------------------------- async


async def test_async_recovery_calls(address: str, dataset: brightrun.Dataset, trainers: list[Trainer]) -> None:
    async with brightrun.AsyncClient(address) as client:
        job = await client.jobs.create(
            dataset=dataset, base_model=MODEL, force=True, recovery_policy=NO_RETRIES, seed=next(_SEEDS)
        )
        trainer = await asyncio.to_thread(Trainer, address, job.id)
        trainers.append(trainer)
        await asyncio.to_thread(trainer.to_training)
        await asyncio.to_thread(trainer.steps, 1, 2)
        assert (await job.pause()).state is JobState.PAUSING
        await asyncio.to_thread(trainer.checkpoint, 2)
        await asyncio.to_thread(trainer.stopped, 2)
        async with contextlib.aclosing(job.watch(timeout=30)) as snapshots:  # type: ignore[type-var]
            async for snapshot in snapshots:
                if snapshot.state is JobState.PAUSED:
                    break
        assert [c.step for c in await job.checkpoints()] == [2]
        await job.resume(pricing="on_demand")
        assert job.compute.pricing_tier is PricingTier.ON_DEMAND
        second = await asyncio.to_thread(Trainer, address, job.id, 2)
        trainers.append(second)
        second.kill()
        with pytest.raises(brightrun.JobNeedsDecision) as caught:
            await job.wait(timeout=30)
        assert set(caught.value.choices) == {RecoveryChoice.KEEP_TRYING, RecoveryChoice.CANCEL}
        assert (await client.jobs.wait(job.id, on_decision="return")).state is JobState.AWAITING_DECISION
        await job.decide("cancel")
        assert job.state is JobState.CANCELLED

        report = await job.failure_report()
        assert report.job_id == job.id
        fixes = await job.suggest_fixes()
        assert fixes.failure_class is FailureClass.USER_CANCEL
        assert [f.id for f in fixes] == ["retry_same_config"]
        retry = await job.retry_with_suggested_fix()
        assert isinstance(retry, brightrun.AsyncJob)
        assert retry.lineage is not None
        assert retry.lineage.retry_of == job.id
        await retry.switch_to_on_demand()
        assert retry.cost.hourly_rate_usd == 7.99
        # Another batch size: the same configuration as the retry would be refused
        # by the double-start guard (DUPLICATE_JOB), and these calls take no force flag.
        continuation = await job.resume_from_checkpoint(
            lr_schedule=brightrun.LrScheduleMode.RESTART_WARMUP, batch_size=2
        )
        assert continuation.lineage is not None
        assert continuation.lineage.resumed_from_job_id == job.id
        results = await client.jobs.bulk_cancel([retry, continuation.id], reason="testing")
        assert [r.job_id for r in results] == [retry.id, continuation.id]
        assert all(r.ok for r in results)
