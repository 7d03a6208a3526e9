"""Several server replicas on one PostgreSQL database, as real processes: they
share the queue without starting any job twice, and when one is killed the
others take over its workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from brightrun.v1 import job_pb2
from brightrun.v1 import job_service_pb2 as js
from tests.conftest import TEST_API_KEY, auth_channel
from tests.server.conftest import TERMINAL, Stubs

pytestmark = pytest.mark.postgres


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    name: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_replica(name: str, *, url: str, data_dir: Path, port: int, trainer: str, tmp_path: Path) -> Replica:
    ready = tmp_path / f"{name}.port"
    env = dict(
        os.environ,
        BRIGHTRUN_DATABASE_URL=url,
        BRIGHTRUN_REUSE_PORT="true",
        BRIGHTRUN_TRAINER_PYTHON=trainer,
        BRIGHTRUN_MAX_CONCURRENT_JOBS="2",
        BRIGHTRUN_REPLICA_TIMEOUT_SECONDS="2",
        BRIGHTRUN_STOP_GRACE_SECONDS="1",
        BRIGHTRUN_LOG_LEVEL="WARNING",
        BRIGHTRUN_BOOTSTRAP_API_KEY=TEST_API_KEY,
    )
    # The child keeps its own descriptor; the parent's copy closes at once.
    with open(tmp_path / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "brightrun_server", "--port", str(port), "--data-dir", str(data_dir),
             "--ready-file", str(ready)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text().strip():
        assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "replica did not start"
        time.sleep(0.05)
    return Replica(proc, name)


def workers(job_ids: list[str]) -> Counter[str]:
    """Live trainer processes per job, from the process table."""
    counts: Counter[str] = Counter()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        for job_id in job_ids:
            if f"{job_id}/attempts/" in text and "--spec" in text:
                counts[job_id] += 1
    return counts


@pytest.fixture
def replicas(
    tmp_path: Path, pg_schema_url: str, sleeper: Path
) -> Iterator[tuple[list[Replica], Stubs, sa.Engine, Path]]:
    data_dir = tmp_path / "shared-data"
    port = free_port()
    a = start_replica("a", url=pg_schema_url, data_dir=data_dir, port=port, trainer=str(sleeper), tmp_path=tmp_path)
    b = start_replica("b", url=pg_schema_url, data_dir=data_dir, port=port, trainer=str(sleeper), tmp_path=tmp_path)
    channel = auth_channel(f"127.0.0.1:{port}")
    stubs = stubs_for_channel(channel)
    engine = sa.create_engine(pg_schema_url.replace("postgresql://", "postgresql+psycopg://", 1))
    yield [a, b], stubs, engine, data_dir
    channel.close()
    engine.dispose()
    for r in (a, b):
        if r.proc.poll() is None:
            r.proc.terminate()
            r.proc.wait(20)
    for pid_dir in Path("/proc").glob("[0-9]*"):  # the sleeping trainers left behind
        try:
            if str(data_dir).encode() in (pid_dir / "cmdline").read_bytes():
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def stubs_for_channel(channel: grpc.Channel) -> Stubs:
    from brightrun.v1 import dataset_service_pb2_grpc, job_service_pb2_grpc, trainer_service_pb2_grpc

    return Stubs(
        channel,
        dataset_service_pb2_grpc.DatasetServiceStub(channel),
        job_service_pb2_grpc.JobServiceStub(channel),
        trainer_service_pb2_grpc.TrainerServiceStub(channel),
    )


def owners(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT job_id, owner FROM job_attempts WHERE end_time IS NULL")).all()
    return {job_id: owner for job_id, owner in rows}


def test_replicas_share_the_queue_and_survive_one_dying(
    replicas: tuple[list[Replica], Stubs, sa.Engine, Path],
) -> None:
    (a, b), stubs, engine, _ = replicas
    dataset = stubs.upload_example()
    jobs = [
        stubs.jobs.CreateJob(
            js.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model", name=f"job {i}", force=True)
        )
        for i in range(6)
    ]
    ids = [j.id for j in jobs]
    # Two replicas x two slots: four jobs start, each exactly once, spread over both replicas.
    deadline = time.monotonic() + 30
    while len(running := owners(engine)) < 4:
        assert time.monotonic() < deadline, running
        time.sleep(0.1)
    time.sleep(2)  # several more scheduling ticks on both replicas
    running = owners(engine)
    assert len(running) == 4
    assert len(set(running.values())) == 2, "both replicas schedule"
    assert set(workers(ids).values()) == {1}, "no job has two workers"
    with engine.connect() as conn:
        attempts = conn.execute(sa.text("SELECT job_id, count(*) FROM job_attempts GROUP BY job_id")).all()
    assert all(n == 1 for _, n in attempts), attempts

    # Kill replica a; its workers keep running and b takes them over.
    a_id, b_id = _replica_of(engine, a), _replica_of(engine, b)
    victim_jobs = [job_id for job_id, owner in owners(engine).items() if owner == a_id]
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    assert set(workers(victim_jobs).values()) == {1}, "the dead replica's trainers live on"
    deadline = time.monotonic() + 30
    while not all(owners(engine).get(j) == b_id for j in victim_jobs):
        assert time.monotonic() < deadline, owners(engine)
        time.sleep(0.2)
    # The survivor controls them: cancelling one stops its worker and settles it.
    target = victim_jobs[0]
    stubs.jobs.CancelJob(js.CancelJobRequest(job_id=target, reason=job_pb2.CANCEL_REASON_TESTING))
    final = stubs.wait_state(target, TERMINAL, timeout=30)
    assert final.state == job_pb2.Job.STATE_CANCELLED
    assert workers([target])[target] == 0
    # And the queue goes on: every job is started by someone, never twice.
    for job_id in ids:
        if job_id != target:
            stubs.jobs.CancelJob(js.CancelJobRequest(job_id=job_id, reason=job_pb2.CANCEL_REASON_TESTING))
    for job_id in ids:
        assert stubs.wait_state(job_id, TERMINAL, timeout=30).state == job_pb2.Job.STATE_CANCELLED
    with engine.connect() as conn:
        attempts = conn.execute(
            sa.text("SELECT job_id, number, count(*) FROM job_attempts GROUP BY job_id, number")
        ).all()
    assert all(n == 1 for _, _, n in attempts)


def _replica_of(engine: sa.Engine, replica: Replica) -> str:
    """A replica's id, found through the attempts its children run."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            # /proc/PID/stat after the command name: state, then the parent's pid.
            if (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[1] != str(replica.proc.pid):
                continue
            text = cmdline.read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            continue
        for job_id, owner in owners(engine).items():
            if f"{job_id}/attempts/" in text:
                return owner
    raise AssertionError(f"replica {replica.name} runs no worker")
