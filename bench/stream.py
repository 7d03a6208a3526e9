"""Metric stream throughput and latency: BrightRun vs a bare grpc.aio server.

    python bench/stream.py [--points 20000] [--subscribers 100] [--live-points 2000]

Baseline, measured in the same run: a bare grpc.aio server (its own process)
that implements JobService.StreamJobMetrics by streaming the same pre-built
StreamJobMetricsResponse messages from memory — no database, no cursor, no
cache. BrightRun runs as `python -m brightrun_server` (its own process, SQLite)
with a job whose metrics were reported through the real TrainerService; a
scripted worker stands in for the trainer so the points are exactly known.

Both are read by the same client code (grpc.aio, one process): 1 subscriber
reading N points, then S concurrent subscribers each reading the whole backlog.
The ratio is BrightRun messages/s over baseline messages/s (goal >= 0.8).

Latency: S subscribers follow a live job while a reporter process sends one
metric per ReportAttempt call; each point carries its send time, and the
subscriber records receipt - send (p50 / p99, ms; same host clock).
Prints progress on stderr and one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _auth import aio_channel, server_env
from _auth import channel as auth_channel
from google.protobuf import timestamp_pb2
from grpc import aio

from brightrun.v1 import (
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    trainer_service_pb2,
    trainer_service_pb2_grpc,
)

REPO = Path(__file__).resolve().parent.parent
TOKEN_KEY = "x-brightrun-attempt-token"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def point(seq: int, step: int) -> job_pb2.MetricPoint:
    return job_pb2.MetricPoint(
        sequence=seq,
        attempt=1,
        step=step,
        epoch=step / 1000,
        train_loss=2.0 / (step + 1),
        learning_rate=2e-4,
        grad_norm=0.5,
        tokens_per_second=12345.0,
        steps_per_second=3.5,
        memory_used_bytes=1 << 30,
        memory_peak_bytes=1 << 31,
    )


# ---------------------------------------------------------------- the bare baseline


def serve_bare(points: int, ready: str) -> None:
    """A grpc.aio server streaming pre-built messages: the floor for any stream."""
    messages = [job_service_pb2.StreamJobMetricsResponse(metric=point(i, i)) for i in range(1, points + 1)]

    class Bare(job_service_pb2_grpc.JobServiceServicer):
        async def StreamJobMetrics(self, request, context):  # type: ignore[no-untyped-def]
            start = max(1, request.from_sequence) - 1
            for message in messages[start:]:
                yield message

    async def main() -> None:
        server = aio.server()
        job_service_pb2_grpc.add_JobServiceServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await asyncio.to_thread(Path(ready).write_text, str(port))
        await server.wait_for_termination()

    asyncio.run(main())


# ---------------------------------------------------------------- BrightRun setup


def start_brightrun(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    sleeper = data_dir / "sleeping-trainer"
    sleeper.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(3600)\n")
    sleeper.chmod(0o755)
    ready = data_dir / "port"
    env = server_env(BRIGHTRUN_TRAINER_PYTHON=str(sleeper), BRIGHTRUN_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "brightrun_server", "--port", "0", "--data-dir", str(data_dir / "data"),
         "--ready-file", str(ready), "--max-concurrent-jobs", "8"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text().strip():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the BrightRun server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{ready.read_text().strip()}"


class ScriptedJob:
    """A job whose worker only sleeps; this object reports as its trainer."""

    def __init__(self, address: str, data_dir: Path) -> None:
        self.channel = auth_channel(address)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.trainer = trainer_service_pb2_grpc.TrainerServiceStub(self.channel)
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(self.channel)
        data = (REPO / "examples" / "data" / "support_chat.jsonl").read_bytes()
        dataset = datasets.UploadDataset(
            iter([
                dataset_service_pb2.UploadDatasetRequest(metadata=dataset_service_pb2.UploadDatasetMetadata(filename="d.jsonl")),
                dataset_service_pb2.UploadDatasetRequest(chunk=data),
            ])
        )  # fmt: skip
        job = self.jobs.CreateJob(job_service_pb2.CreateJobRequest(dataset_id=dataset.id, base_model="bench/model"))
        self.job_id = job.id
        spec_path = data_dir / "data" / "jobs" / job.id / "attempts" / "1" / "spec.json"
        deadline = time.monotonic() + 30
        while not spec_path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the job was never provisioned")
            time.sleep(0.02)
        spec = json.loads(spec_path.read_text())
        self.attempt_id, self.token = spec["attempt_id"], spec["report"]["token"]
        self.seq = 0
        self.step = 0
        self.report([trainer_service_pb2.AttemptReport(stage=trainer_service_pb2.StageReport(
            stage=job_pb2.STAGE_TRAINING, status=job_pb2.JobStage.STATUS_RUNNING))])  # fmt: skip

    def report(self, reports: list[trainer_service_pb2.AttemptReport]) -> None:
        for r in reports:
            self.seq += 1
            r.sequence = self.seq
        self.trainer.ReportAttempt(
            trainer_service_pb2.ReportAttemptRequest(attempt_id=self.attempt_id, reports=reports),
            metadata=((TOKEN_KEY, self.token),),
        )

    def metrics(self, count: int, *, stamp: bool = False) -> None:
        reports = []
        for _ in range(count):
            self.step += 1
            m = point(0, self.step)
            if stamp:
                ts = timestamp_pb2.Timestamp()
                ts.GetCurrentTime()
                m.time.CopyFrom(ts)
            reports.append(trainer_service_pb2.AttemptReport(metric=m))
        self.report(reports)

    def finish(self) -> None:
        failure = job_pb2.JobFailure(exception_type="BenchDone", message="benchmark finished")
        result = trainer_service_pb2.AttemptResult(
            outcome=trainer_service_pb2.AttemptResult.OUTCOME_FAILED, failure=failure
        )
        self.report([trainer_service_pb2.AttemptReport(result=result)])


# ---------------------------------------------------------------- the client side (shared)


async def read_all(address: str, job_id: str, subscribers: int, expect: int) -> float:
    """Messages per second for `subscribers` concurrent full-backlog reads."""
    channels = [aio_channel(address) for _ in range(min(subscribers, 8))]

    async def one(i: int) -> int:
        stub = job_service_pb2_grpc.JobServiceStub(channels[i % len(channels)])
        n = 0
        async for _ in stub.StreamJobMetrics(job_service_pb2.StreamJobMetricsRequest(job_id=job_id, from_sequence=1)):
            n += 1
            if n == expect:
                break
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(subscribers)))
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    if any(c != expect for c in counts):
        raise RuntimeError(f"a subscriber got {min(counts)} of {expect} points")
    return sum(counts) / elapsed


async def follow(address: str, job_id: str, subscribers: int, expect: int, started: asyncio.Event) -> list[float]:
    latencies: list[float] = []
    ready = 0

    async def one() -> None:
        nonlocal ready
        async with aio_channel(address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            stream = stub.StreamJobMetrics(job_service_pb2.StreamJobMetricsRequest(job_id=job_id, from_sequence=1))
            await stream.wait_for_connection()
            ready += 1
            if ready == subscribers:
                started.set()
            n = 0
            async for response in stream:
                sent = response.metric.time.ToNanoseconds()
                latencies.append((time.time_ns() - sent) / 1e6)
                n += 1
                if n == expect:
                    break

    await asyncio.gather(*(one() for _ in range(subscribers)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=20_000, help="backlog points for 1 subscriber")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument(
        "--points-many", type=int, default=2_000, help="backlog points each of the many subscribers reads"
    )
    parser.add_argument("--live-points", type=int, default=1_000)
    parser.add_argument("--live-rate", type=float, default=200.0, help="points per second in the live phase")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.points_many > args.points:
        parser.error("--points-many must not exceed --points")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        ready = tmp_dir / "bare-port"
        bare = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(args.points), str(ready)])
        server, address = start_brightrun(tmp_dir)
        try:
            while not ready.exists() or not ready.read_text():
                time.sleep(0.05)
            bare_address = f"127.0.0.1:{ready.read_text()}"
            log(f"bare baseline on {bare_address}; BrightRun on {address}")

            job = ScriptedJob(address, tmp_dir)
            for _ in range(0, args.points, 500):
                job.metrics(500)
            job.finish()
            log(f"reported {args.points} points to {job.job_id}")

            results: dict[str, dict[str, float]] = {}
            for label, subs, n in (("1", 1, args.points), (str(args.subscribers), args.subscribers, args.points_many)):
                ours, base = [], []
                for _ in range(args.repeats):  # interleaved so drift hits both alike
                    base.append(asyncio.run(read_all(bare_address, job.job_id, subs, n)))
                    ours.append(asyncio.run(read_all(address, job.job_id, subs, n)))
                results[label] = {
                    "brightrun_msgs_per_s": round(statistics.median(ours)),
                    "bare_grpc_msgs_per_s": round(statistics.median(base)),
                    "ratio": round(statistics.median(ours) / statistics.median(base), 3),
                }
                log(f"{label} subscriber(s): {results[label]}")

            live = ScriptedJob(address, tmp_dir)

            async def live_phase() -> list[float]:
                started = asyncio.Event()
                followers = asyncio.create_task(
                    follow(address, live.job_id, args.subscribers, args.live_points, started)
                )
                await started.wait()
                interval = 1.0 / args.live_rate
                loop = asyncio.get_running_loop()
                for _ in range(args.live_points):
                    t = time.perf_counter()
                    await loop.run_in_executor(None, lambda: live.metrics(1, stamp=True))
                    await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t)))
                return await followers

            latencies = asyncio.run(live_phase())
            live.finish()
            log(f"live: {len(latencies)} receipts")
        finally:
            server.terminate()
            bare.terminate()
            server.wait(30)
            bare.wait(30)
            # The server leaves workers running when it stops (by design: a restart
            # re-attaches them); these stand-ins are the benchmark's to end.
            subprocess.run(["pkill", "-9", "-f", str(tmp_dir)], check=False)

    summary = {
        "benchmark": "stream",
        "subscribers_1": results["1"],
        f"subscribers_{args.subscribers}": results[str(args.subscribers)],
        "ratio_1": results["1"]["ratio"],
        f"ratio_{args.subscribers}": results[str(args.subscribers)]["ratio"],
        "goal_ratio": 0.8,
        "live_latency_ms": {
            "subscribers": args.subscribers,
            "points": args.live_points,
            "rate_per_s": args.live_rate,
            "p50": round(percentile(latencies, 0.50), 2),
            "p99": round(percentile(latencies, 0.99), 2),
            "max": round(max(latencies), 2),
        },
        "goal_met": min(results["1"]["ratio"], results[str(args.subscribers)]["ratio"]) >= 0.8,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-bare":
        serve_bare(int(sys.argv[2]), sys.argv[3])
    else:
        main()
