"""Assertions shared by the durability tests: a job's stored metrics and events
have gap-free sequences, list and stream agree, and no attempt reported a step
twice."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

from brightrun.v1 import job_pb2, job_service_pb2
from tests.e2e.harness import Api

State = job_pb2.Job.State

#: What identifies a metric point apart from its values and time.
Shape = tuple[int, int, bool, bool]


def shape(points: list[job_pb2.MetricPoint]) -> list[Shape]:
    """(attempt, step, has train loss, has eval loss) of each point, in order."""
    return [(p.attempt, p.step, p.HasField("train_loss"), p.HasField("eval_loss")) for p in points]


def stored_metrics(api: Api, job_id: str) -> list[job_pb2.MetricPoint]:
    """A job's metrics, checked: sequences 1..n without gaps or duplicates, the
    stream from sequence 0 delivers exactly the listed points, and within each
    attempt the train steps are consecutive and each reported once."""
    listed = api.metrics(job_id)
    assert [p.sequence for p in listed] == list(range(1, len(listed) + 1)), f"{job_id}: metric sequence gaps/dups"
    stream = api.jobs.StreamJobMetrics(
        job_service_pb2.StreamJobMetricsRequest(job_id=job_id, from_sequence=0), timeout=60
    )
    streamed = [r.metric for r in stream]
    assert streamed == listed, f"{job_id}: the stream from 0 differs from the list"
    steps: dict[int, list[int]] = defaultdict(list)
    for p in listed:
        if p.HasField("train_loss"):
            steps[p.attempt].append(p.step)
    for attempt, seen in steps.items():
        assert seen == list(range(seen[0], seen[0] + len(seen))), f"{job_id} attempt {attempt}: steps {seen}"
    evals = Counter((p.attempt, p.step) for p in listed if p.HasField("eval_loss") and not p.HasField("train_loss"))
    assert all(n == 1 for n in evals.values()), f"{job_id}: an evaluation stored twice: {evals}"
    return listed


def stored_events(api: Api, job_id: str) -> list[job_pb2.JobEvent]:
    """A job's events, checked for gap-free sequences."""
    events = api.events(job_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1)), f"{job_id}: event sequence gaps/dups"
    return events


def wait_all(api: Api, job_ids: list[str], timeout: float = 240) -> dict[str, job_pb2.Job]:
    """Wait until every job is terminal."""
    deadline = time.monotonic() + timeout
    done: dict[str, job_pb2.Job] = {}
    for job_id in job_ids:
        done[job_id] = api.wait(job_id, timeout=max(1.0, deadline - time.monotonic()))
    return done


def wait_training(api: Api, job_ids: list[str], min_step: int, timeout: float = 120) -> list[job_pb2.Job]:
    """Wait until each of `job_ids` trains at or past `min_step`."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = [api.get(job_id) for job_id in job_ids]
        if all(j.state == State.STATE_TRAINING and j.progress.current_step >= min_step for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(
                "not all training past step "
                f"{min_step}: {[(State.Name(j.state), j.progress.current_step, j.state_message) for j in jobs]}"
            )
        time.sleep(0.1)


def outbox_metrics(data_dir: Path, job_id: str) -> list[job_pb2.MetricPoint]:
    """The metric points every attempt of a job wrote to its outbox, attempt by attempt."""
    from brightrun_trainer.report import read_outbox

    points: list[job_pb2.MetricPoint] = []
    attempts = sorted((data_dir / "jobs" / job_id / "attempts").iterdir(), key=lambda p: int(p.name))
    for attempt_dir in attempts:
        points.extend(r.metric for r in read_outbox(attempt_dir / "reports.jsonl") if r.HasField("metric"))
    return points


def same_points(stored: list[job_pb2.MetricPoint], written: list[job_pb2.MetricPoint]) -> bool:
    """Whether the stored points are exactly the written ones, in order (sequence and time aside)."""

    def bare(p: job_pb2.MetricPoint) -> bytes:
        copy = job_pb2.MetricPoint()
        copy.CopyFrom(p)
        copy.ClearField("sequence")
        copy.ClearField("time")
        return copy.SerializeToString(deterministic=True)

    return [bare(p) for p in stored] == [bare(p) for p in written]
