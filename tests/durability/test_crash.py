"""The server dies (SIGKILL) or stays away for a while as real trainers train;
after a restart on the same data dir nothing is lost, doubled or started twice."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import brightrun
from brightrun.retry import RetryPolicy
from brightrun.v1 import job_pb2, job_service_pb2
from tests.conftest import EXAMPLES
from tests.durability.checks import (
    outbox_metrics,
    same_points,
    shape,
    stored_events,
    stored_metrics,
    wait_all,
    wait_training,
)
from tests.durability.conftest import CHECKPOINT_INTERVAL, MAX_STEPS, SMALL_CONFIG, ServerFactory
from tests.durability.harness import Sampler, attempt_rows, connect, trainers, wait_attempts_ended

State = job_pb2.Job.State
SLOTS = 5
#: Long enough that the first five jobs all train at once, and the survivors are
#: still training when the server is killed, on a loaded 2-core machine: with
#: MAX_STEPS (100) under the full suite's load the first job finished before the
#: fifth reached its first step.
TEN_JOB_STEPS = 3 * MAX_STEPS
TEN_JOB_CONFIG = job_pb2.TrainingConfig(max_steps=TEN_JOB_STEPS, epochs=8)  # 8 epochs: > 300 steps


@pytest.mark.slow
def test_sigkill_while_ten_jobs_train(server_process: ServerFactory, tiny_model: Path, small_dataset: Path) -> None:
    server = server_process(max_concurrent_jobs=SLOTS).start()
    data_dir = server.data_dir
    api = connect(server.address)
    dataset = api.upload(small_dataset)
    config = job_pb2.TrainingConfig()
    config.CopyFrom(SMALL_CONFIG)
    config.MergeFrom(TEN_JOB_CONFIG)
    ids = [api.create(dataset.id, str(tiny_model), config, name=f"crash-{i}").id for i in range(10)]
    victim, survivors = ids[0], ids[1:SLOTS]
    sampler = Sampler(lambda: trainers(data_dir))
    try:
        # The first five train, the first of them past its first checkpoint; five wait in the queue.
        wait_training(api, ids[:SLOTS], min_step=1)
        wait_training(api, ids[:1], min_step=CHECKPOINT_INTERVAL + 2)
        assert [api.get(i).state for i in ids[SLOTS:]] == [State.STATE_QUEUED] * (10 - SLOTS)
        before = {a.job_id: a for a in attempt_rows(data_dir)}
        assert sorted(before) == sorted(ids[:SLOTS])
        assert all(a.number == 1 for a in before.values())
        assert sorted(trainers(data_dir)) == sorted(a.pid for a in before.values())

        server.kill()  # SIGKILL: no shutdown code runs
        # While the server is down the worker of the first job dies too; the other four keep training.
        pid = before[victim].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(2)
        checkpoints = data_dir / "jobs" / victim / "checkpoints"
        newest_checkpoint = max(int(p.name.removeprefix("step-")) for p in checkpoints.glob("step-*"))
        assert sorted(trainers(data_dir)) == sorted(before[j].pid for j in survivors)  # type: ignore[type-var]

        server.start()
        done = wait_all(api, ids)
    finally:
        samples = sampler.stop()
        api.close()

    assert {j: State.Name(d.state) for j, d in done.items()} == dict.fromkeys(ids, "STATE_COMPLETED")

    # Nothing started twice: one attempt per job, two for the job whose worker
    # died; survivors finished in the very process that trained before the crash.
    attempts = wait_attempts_ended(data_dir)
    numbers = {j: [a.number for a in attempts if a.job_id == j] for j in ids}
    assert numbers == {j: [1, 2] if j == victim else [1] for j in ids}
    assert {j: d.attempt_count for j, d in done.items()} == {j: len(n) for j, n in numbers.items()}
    pids = [a.pid for a in attempts]
    assert None not in pids
    assert len(set(pids)) == len(pids)
    for job_id in survivors:
        (attempt,) = (a for a in attempts if a.job_id == job_id)
        assert (attempt.pid, attempt.state) == (before[job_id].pid, "succeeded")
    log = server.logs()
    for job_id in survivors:
        assert f"re-attached to trainer pid {before[job_id].pid}" in log
    # Never two workers for one job, never more than the slots, restart included.
    assert samples, "the sampler took no samples"
    for sample in samples:
        per_job = Counter(v.split("/")[0] for v in sample.values())
        assert max(per_job.values(), default=0) <= 1, sample
        assert len(sample) <= SLOTS, sample
    # Queued jobs kept their order: first attempts started in creation order.
    assert [a.job_id for a in attempts if a.number == 1] == ids

    # The lost worker was classified and recovered by policy from its checkpoint.
    lost = done[victim]
    assert [(i.attempt, i.failure_class, i.recovered) for i in lost.interruptions] == [
        (1, job_pb2.FAILURE_CLASS_WORKER_LOST, True)
    ]
    resumed = lost.interruptions[0].resumed_from_step
    assert resumed == newest_checkpoint >= CHECKPOINT_INTERVAL

    # Metrics: gap-free, list == stream, no step doubled within an attempt; an
    # uninterrupted job (the last one) is the reference shape for everyone else.
    api = connect(server.address)
    try:
        reference = shape(stored_metrics(api, ids[-1]))
        assert [s[1] for s in reference if s[2]] == list(range(1, TEN_JOB_STEPS + 1))
        for job_id in ids:
            points = stored_metrics(api, job_id)
            stored_events(api, job_id)
            assert same_points(points, outbox_metrics(data_dir, job_id)), f"{job_id}: stored != written"
            if job_id != victim:
                assert shape(points) == reference, job_id
                continue
            train = [(p.attempt, p.step) for p in points if p.HasField("train_loss")]
            first = [s for a, s in train if a == 1]
            second = [s for a, s in train if a == 2]
            assert first[0] == 1
            assert first[-1] >= resumed
            assert second == list(range(resumed + 1, TEN_JOB_STEPS + 1))
    finally:
        api.close()


OUTAGE_SECONDS = 30
#: Long enough that both jobs are surely training when the server is killed
#: (a few seconds here), short enough to end during the outage.
FINISHER_STEPS = 100
#: How long the outage may stretch while the short job finishes (slow machines).
FINISHER_DEADLINE = 180


@pytest.mark.slow
def test_server_away_for_30_seconds_loses_nothing(
    server_process: ServerFactory, tiny_model: Path, small_dataset: Path
) -> None:
    """The server is killed and stays away for 30 s. One trainer finishes
    meanwhile (its last reports wait in its outbox, read when the next server
    finds the process gone); the other trains on through the outage and
    redelivers everything itself once the server is back. An SDK stream follows
    the long job across the outage. The long job is cancelled at the end, so the
    test does not depend on how fast this machine trains."""
    server = server_process(max_concurrent_jobs=2).start()
    data_dir = server.data_dir
    api = connect(server.address)
    dataset = api.upload(small_dataset)
    # Four copies of the example data (608 steps an epoch, 6080 in all): far more
    # than this machine trains during the test, however fast it is.
    big = data_dir.parent / "support_chat_x4.jsonl"
    big.write_bytes((EXAMPLES / "support_chat.jsonl").read_bytes() * 4)
    full = api.upload(big)
    short, long = job_pb2.TrainingConfig(), job_pb2.TrainingConfig()
    short.CopyFrom(SMALL_CONFIG)
    short.max_steps = FINISHER_STEPS
    long.CopyFrom(SMALL_CONFIG)
    long.epochs, long.max_steps, long.checkpoint_interval_steps = 10, 0, 100
    finisher = api.create(dataset.id, str(tiny_model), short, name="finishes-while-away").id
    runner = api.create(full.id, str(tiny_model), long, name="trains-through").id
    ids = [finisher, runner]
    client = brightrun.Client(server.address, retry=RetryPolicy(max_attempts=200, maximum=2.0))
    followed: list[brightrun.MetricPoint] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            followed.extend(client.jobs.get(runner).stream_metrics())
        except Exception as e:  # reported below
            errors.append(e)

    follower = threading.Thread(target=follow, name="sdk-stream", daemon=True)
    follower.start()
    try:
        wait_training(api, ids, min_step=5)
        pids = {a.job_id: a.pid for a in attempt_rows(data_dir)}
        server.kill()
        away = time.monotonic()
        # The short job finishes training, tries to deliver for a while, and
        # exits; the outage lasts 30 s, longer if that takes longer here.
        while pids[finisher] in trainers(data_dir) and time.monotonic() - away < FINISHER_DEADLINE:
            time.sleep(0.2)
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - away)))
        assert list(trainers(data_dir)) == [pids[runner]], "the short job should have ended, the long one not"
        step_while_away = max(p.step for p in outbox_metrics(data_dir, runner))
        assert step_while_away > 5 + 10, "the long job should have trained on while the server was away"

        server.start()
        # Everything written while away arrives, then live reports go on.
        deadline = time.monotonic() + 90
        while api.get(runner).progress.current_step < step_while_away + 20:
            assert time.monotonic() < deadline, (
                "the long job's reports did not come through after the restart: "
                f"step {api.get(runner).progress.current_step}, away at {step_while_away}\n{server.log_tail()}"
            )
            time.sleep(0.2)
        api.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=runner, reason=job_pb2.CANCEL_REASON_TESTING))
        done = wait_all(api, ids, timeout=120)
        follower.join(60)
        assert not follower.is_alive(), errors
        assert not errors, errors
        assert {j: State.Name(d.state) for j, d in done.items()} == {
            finisher: "STATE_COMPLETED",
            runner: "STATE_CANCELLED",
        }
        assert {j: (d.attempt_count, len(d.interruptions)) for j, d in done.items()} == dict.fromkeys(ids, (1, 0))
        assert sorted((a.job_id, a.number, a.pid, a.state) for a in wait_attempts_ended(data_dir)) == sorted(
            [(finisher, 1, pids[finisher], "succeeded"), (runner, 1, pids[runner], "stopped")]
        )
        assert f"re-attached to trainer pid {pids[runner]}" in server.logs()
        for job_id in ids:
            points = stored_metrics(api, job_id)
            stored_events(api, job_id)
            assert same_points(points, outbox_metrics(data_dir, job_id)), f"{job_id}: stored != written"
            steps = [p.step for p in points if p.HasField("train_loss")]
            assert steps == list(range(1, (short.max_steps if job_id == finisher else steps[-1]) + 1))
        # The SDK stream that was open across the outage saw exactly the stored sequence.
        points = stored_metrics(api, runner)
        assert [p.sequence for p in followed] == [p.sequence for p in points]
        assert [p.train_loss for p in followed] == [p.train_loss if p.HasField("train_loss") else None for p in points]
    finally:
        client.close()
        api.close()
