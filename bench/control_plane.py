"""Control-plane latency and throughput.

    python bench/control_plane.py [--quick] [--jobs 100000] [--no-postgres]

For SQLite and PostgreSQL (the local server, a scratch schema), with the
BrightRun server in its own process (`python -m brightrun_server`, workers that
only sleep so no training competes for the CPU):

* CreateJob p50 / p99 and throughput with 1 and 50 concurrent clients;
* ListJobs p99 over 100k jobs (bulk-inserted rows cloned from a real job), for
  a state filter (indexed) and a label filter (JSON), page size 50;
* slot freed -> next job provisioning: with one slot and a queue, the time from
  the running worker's death to the next job's claim (server event times); the
  jobs have no automatic retries, so the killed one frees its slot.

Baseline in the same run: a bare grpc.aio unary echo server (its own process)
driven by the same client code, so each latency has a floor to compare with.
Goals (issue 6): CreateJob p99 <= 20 ms on SQLite with 1 client; ListJobs p99
<= 50 ms at 100k jobs. Progress on stderr; one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _auth import aio_channel, server_env
from grpc import aio

from brightrun.v1 import dataset_service_pb2 as ds
from brightrun.v1 import dataset_service_pb2_grpc, job_pb2, job_service_pb2_grpc
from brightrun.v1 import job_service_pb2 as js

REPO = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("BRIGHTRUN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- the bare baseline


def serve_echo(ready: str) -> None:
    class Echo(job_service_pb2_grpc.JobServiceServicer):
        async def GetJob(self, request, context):  # type: ignore[no-untyped-def]
            return job_pb2.Job(id=request.job_id)

    async def main() -> None:
        server = aio.server()
        job_service_pb2_grpc.add_JobServiceServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await asyncio.to_thread(Path(ready).write_text, str(port))
        await server.wait_for_termination()

    asyncio.run(main())


# ---------------------------------------------------------------- measurement


async def load(call: Callable[[int], Awaitable[Any]], *, clients: int, total: int) -> dict[str, float]:
    """Run `total` calls from `clients` concurrent loops; latency percentiles and throughput."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def client() -> None:
        for i in counter:
            t = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - t) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": round(pct(latencies, 0.50), 3),
        "p99_ms": round(pct(latencies, 0.99), 3),
        "per_s": round(total / elapsed, 1),
        "calls": total,
    }


def start_server(data_dir: Path, url: str | None, sleeper: Path, slots: int) -> tuple[subprocess.Popen[bytes], str]:
    ready = data_dir / "port"
    env = server_env(
        BRIGHTRUN_TRAINER_PYTHON=str(sleeper),
        BRIGHTRUN_LOG_LEVEL="WARNING",
        BRIGHTRUN_STOP_GRACE_SECONDS="0.5",
        BRIGHTRUN_MAX_CONCURRENT_JOBS=str(slots),
    )
    if url:
        env["BRIGHTRUN_DATABASE_URL"] = url
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "brightrun_server",
            "--port",
            "0",
            "--data-dir",
            str(data_dir / "data"),
            "--ready-file",
            str(ready),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{ready.read_text().strip()}"


def stop(proc: subprocess.Popen[bytes], work: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    subprocess.run(["pkill", "-9", "-f", str(work)], check=False)


async def upload(channel: aio.Channel) -> str:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    data = (REPO / "examples" / "data" / "support_chat.jsonl").read_bytes()

    async def chunks():  # type: ignore[no-untyped-def]
        yield ds.UploadDatasetRequest(metadata=ds.UploadDatasetMetadata(filename="chat.jsonl"))
        yield ds.UploadDatasetRequest(chunk=data)

    dataset = await stub.UploadDataset(chunks())
    return str(dataset.id)


def clone_jobs(sync_url: str, template_id: str, count: int) -> None:
    """Insert `count` jobs cloned from a real one: varied states, labels and times."""
    engine = sa.create_engine(sync_url)
    jobs = sa.Table("jobs", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        template = dict(conn.execute(sa.select(jobs).where(jobs.c.id == template_id)).mappings().one())
    # Terminal states only: cloned rows must not be picked up by the scheduler.
    states = ["completed"] * 7 + ["failed", "failed", "cancelled"]
    base = datetime.now(UTC) - timedelta(days=60)
    batch: list[dict[str, Any]] = []
    with engine.begin() as conn:
        for i in range(count):
            row = dict(template)
            row.update(
                id=f"job_bench{i:08d}",
                name=f"bench job {i}",
                state=states[i % len(states)],
                create_time=base + timedelta(seconds=i * 50),
                update_time=base + timedelta(seconds=i * 50),
                labels={"team": f"team-{i % 20}", "run": str(i)},
                request_id=None,
                fingerprint=f"fp{i}",
                root_job_id=f"job_bench{i:08d}",
            )
            batch.append(row)
            if len(batch) == 5000:
                conn.execute(jobs.insert(), batch)
                batch = []
        if batch:
            conn.execute(jobs.insert(), batch)
    # PostgreSQL: refresh the planner's statistics, as autovacuum does within a
    # minute of a bulk load: measured straight after 100k inserts with none,
    # PostgreSQL plans the label filter as a sort of all 100k rows. (SQLite keeps
    # statistics only where ANALYZE is run by hand; the server never does.)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE jobs"))
    engine.dispose()


async def slot_latency(address: str, sync_url: str, dataset_id: str, repeats: int) -> dict[str, float]:
    """One slot: kill the running worker, time until the next job is claimed (server clock)."""
    async with aio_channel(address) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        # No automatic recovery: a job in its recovery backoff keeps its slot (so
        # its retry does not wait for a whole other job), which is not what this
        # measures. Without retries the killed job waits for a decision, slot freed.
        no_retries = job_pb2.RecoveryPolicy(max_system_retries=0)
        jobs = [
            await stub.CreateJob(
                js.CreateJobRequest(
                    dataset_id=dataset_id,
                    base_model="bench/model",
                    name=f"slot {i}",
                    force=True,
                    recovery_policy=no_retries,
                )
            )
            for i in range(repeats + 1)
        ]
        samples: list[float] = []
        engine = sa.create_engine(sync_url)
        for current, following in itertools.pairwise(jobs):
            pid = await _worker_pid(engine, current.id)
            killed = datetime.now(UTC)
            os.kill(pid, signal.SIGKILL)
            claimed = await _claim_time(stub, following.id)
            samples.append((claimed - killed).total_seconds() * 1000)
        engine.dispose()
        for job in jobs:
            await stub.CancelJob(js.CancelJobRequest(job_id=job.id, reason=job_pb2.CANCEL_REASON_TESTING))
    return {"p50_ms": round(pct(samples, 0.5), 1), "p99_ms": round(pct(samples, 0.99), 1), "samples": len(samples)}


def _running_pid(engine: sa.Engine, job_id: str) -> int | None:
    with engine.connect() as conn:
        pid = conn.execute(
            sa.text("SELECT pid FROM job_attempts WHERE job_id = :j AND end_time IS NULL AND pid IS NOT NULL"),
            {"j": job_id},
        ).scalar()
    return int(pid) if pid else None


def _wait_pid(engine: sa.Engine, job_id: str) -> int:
    deadline = time.monotonic() + 60
    while (pid := _running_pid(engine, job_id)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{job_id} never started")
        time.sleep(0.01)
    return pid


async def _worker_pid(engine: sa.Engine, job_id: str) -> int:
    return await asyncio.to_thread(_wait_pid, engine, job_id)


async def _claim_time(stub: job_service_pb2_grpc.JobServiceStub, job_id: str) -> datetime:
    async with asyncio.timeout(60):
        while True:
            events = await stub.ListJobEvents(js.ListJobEventsRequest(job_id=job_id, query="provisioning"))
            for event in events.events:
                if event.code == "STATE_CHANGED" and event.payload["to"] == "provisioning":
                    return event.time.ToDatetime(tzinfo=UTC)
            await asyncio.sleep(0.01)


async def run_backend(name: str, url: str | None, args: argparse.Namespace, tmp: Path, sleeper: Path) -> dict[str, Any]:
    work = tmp / name
    work.mkdir()
    proc, address = await asyncio.to_thread(start_server, work, url, sleeper, 1)
    sync_url = (url or f"sqlite:///{work / 'data' / 'brightrun.db'}").replace("postgresql://", "postgresql+psycopg://")
    try:
        async with aio_channel(address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            dataset_id = await upload(channel)

            def create(prefix: str) -> Callable[[int], Awaitable[Any]]:
                async def call(i: int) -> Any:
                    return await stub.CreateJob(
                        js.CreateJobRequest(
                            request_id=f"{prefix}-{i}",
                            dataset_id=dataset_id,
                            base_model="Qwen/Qwen2.5-0.5B",
                            name=f"bench {i}",
                            force=True,
                        )
                    )

                return call

            await load(create(f"warm-{uuid.uuid4().hex[:6]}"), clients=1, total=20)
            one = await load(create(f"one-{uuid.uuid4().hex[:6]}"), clients=1, total=args.creates)
            log(f"{name}: CreateJob, 1 client: {one}")
            many = await load(create(f"many-{uuid.uuid4().hex[:6]}"), clients=50, total=args.creates * 2)
            log(f"{name}: CreateJob, 50 clients: {many}")
            template = (await stub.ListJobs(js.ListJobsRequest(page_size=1))).jobs[0].id
            started = time.perf_counter()
            await asyncio.to_thread(clone_jobs, sync_url, template, args.jobs)
            log(f"{name}: inserted {args.jobs} jobs in {time.perf_counter() - started:.1f}s")
            lists = {}
            for label, flt in (("state_filter", "state = FAILED"), ("label_filter", 'labels.team = "team-7"')):

                async def list_call(i: int, flt: str = flt) -> Any:
                    return await stub.ListJobs(js.ListJobsRequest(filter=flt, page_size=50))

                await load(list_call, clients=1, total=10)
                lists[label] = await load(list_call, clients=1, total=args.lists)
                log(f"{name}: ListJobs {label}: {lists[label]}")
            # Clear the CreateJob backlog, then the job holding the slot, so the slot
            # test's jobs are next. The backlog first: cancelled first, the holder's
            # freed slot went to the oldest queued job, which then held it for good.
            for state in ("QUEUED", "PROVISIONING"):
                await stub.BulkCancelJobs(
                    js.BulkCancelJobsRequest(filter=f"state = {state}", reason=job_pb2.CANCEL_REASON_TESTING)
                )
        slot = await slot_latency(address, sync_url, dataset_id, args.slot_repeats)
        log(f"{name}: slot freed -> next claimed: {slot}")
    finally:
        await asyncio.to_thread(stop, proc, work)
    return {"create_1_client": one, "create_50_clients": many, "list_jobs": lists, "slot_freed_to_claim": slot}


def _wait_port(ready: Path) -> str:
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text():
        if time.monotonic() > deadline:
            raise RuntimeError("echo server did not start")
        time.sleep(0.05)
    return ready.read_text()


async def echo_baseline(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ready = tmp / "echo-port"
    proc = await asyncio.to_thread(subprocess.Popen, [sys.executable, __file__, "--serve-echo", str(ready)])
    try:
        port = await asyncio.to_thread(_wait_port, ready)
        async with aio_channel(f"127.0.0.1:{port}") as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)

            async def call(i: int) -> Any:
                return await stub.GetJob(js.GetJobRequest(job_id=f"j{i}"))

            await load(call, clients=1, total=50)
            one = await load(call, clients=1, total=args.creates)
            many = await load(call, clients=50, total=args.creates * 2)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
    log(f"bare echo: 1 client {one}; 50 clients {many}")
    return {"one_client": one, "fifty_clients": many}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--creates", type=int, default=500)
    parser.add_argument("--lists", type=int, default=200)
    parser.add_argument("--slot-repeats", type=int, default=10)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--quick", action="store_true", help="10k jobs, fewer calls")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.creates, args.lists, args.slot_repeats = 10_000, 100, 50, 3

    async def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            sleeper = tmp / "sleeping-trainer"
            sleeper.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(3600)\n")
            sleeper.chmod(0o755)
            results: dict[str, Any] = {"baseline_echo": await echo_baseline(args, tmp)}
            results["sqlite"] = await run_backend("sqlite", None, args, tmp, sleeper)
            if not args.no_postgres:
                schema = f"bench_{uuid.uuid4().hex[:8]}"
                admin = sa.create_engine(PG_BASE.replace("postgresql://", "postgresql+psycopg://", 1))
                with admin.begin() as conn:
                    conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
                try:
                    url = f"{PG_BASE}?options=-csearch_path%3D{schema}"
                    results["postgresql"] = await run_backend("postgresql", url, args, tmp, sleeper)
                finally:
                    with admin.begin() as conn:
                        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
                    admin.dispose()
            return results

    results = asyncio.run(run())
    echo = results["baseline_echo"]
    sqlite = results["sqlite"]
    summary: dict[str, Any] = {
        "benchmark": "control_plane",
        "jobs_in_table": args.jobs,
        **results,
        "ratios_vs_echo": {
            "create_p99_1_client": round(sqlite["create_1_client"]["p99_ms"] / echo["one_client"]["p99_ms"], 2),
            "create_throughput_50_clients": round(
                sqlite["create_50_clients"]["per_s"] / echo["fifty_clients"]["per_s"], 3
            ),
        },
        "goals": {
            "create_p99_le_20ms_sqlite_1_client": sqlite["create_1_client"]["p99_ms"] <= 20,
            "list_p99_le_50ms": all(v["p99_ms"] <= 50 for v in sqlite["list_jobs"].values())
            and all(v["p99_ms"] <= 50 for v in results.get("postgresql", sqlite)["list_jobs"].values()),
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-echo":
        serve_echo(sys.argv[2])
    else:
        main()
