"""Soak: many concurrent clients against a server training real jobs while trainers are killed.

    python bench/soak.py [--duration 300] [--clients 50] [--seed N] [--quick]

A real BrightRun server (``python -m brightrun_server``, its own process,
SQLite, ``--max-concurrent-jobs 2``, one torch thread per trainer) runs
tiny-model jobs with real trainers, on loopback. One process of grpc.aio
clients (``--clients`` coroutines over a few channels, each pausing a random
think time between calls so the offered load is bounded and the client is not
the bottleneck; the event-loop lag and the client's CPU are reported to show
it) runs a mix of

* CreateJob — a real tiny training job with a unique request_id, at most
  ``--create-rate`` a second and only while few jobs are queued; now and then
  a replay of an earlier request_id, which must return the same job;
* ListJobs, without and with a filter (state, labels, both);
* GetJob;
* StreamJobMetrics — reads part of a job's stream from a random sequence,
  then resumes from the last received sequence + 1, checking continuity;
* CancelJob — a queued job whenever more than ``--max-queued`` wait (this
  bounds the work on a small machine; mostly the newest, so older ones get to
  train, sometimes the oldest, which races with the scheduler claiming it),
  every ``--cancel-running-every`` seconds a training job, otherwise a job that
  already ended (FAILED_PRECONDITION when it completed: expected).

Phases, against the same server:

1. setup: a seed job trains to completion (a backlog to stream and a finished
   job to cancel in the quiet phase);
2. quiet (the baseline, 15 s; 10 s with --quick): the same client mix with no
   training and no faults — both slots are held by two jobs whose trainers are
   SIGSTOPped at birth, so jobs created meanwhile stay queued and cost no CPU;
3. soak (``--duration``): the blockers continue, jobs train, and a fault
   injector SIGKILLs or SIGTERMs a random trainer of this run every 10-20 s
   (seeded); the server's recovery policy resumes them;
4. drain: queued jobs are cancelled, running ones get a bounded time to finish,
   the rest are cancelled;
5. verification, per job: the metric points from ListJobMetrics (small pages)
   and from StreamJobMetrics (from 0 to the end) must have sequence numbers
   1..last_metric_sequence with no gap (``lost_metrics``) and no repeat
   (``duplicated_metrics``), agree with each other, and hold no two points of
   one kind (train / eval-only) for the same (attempt, step). Steps redone by a
   later attempt after a SIGKILL are expected and only counted.

Reported: ops/s overall and per operation, p50 / p99 latency (ms) per
operation, status codes split into expected and unexpected, the soak / quiet
ratios (throughput and p99 per operation), kills, job outcomes, metric checks,
load average. Progress on stderr; the last line of stdout is one JSON object.
Exit status 1 when a metric was lost or duplicated (in the final reads or in a
client's stream, resumes included), two points share an (attempt, step, kind),
ListJobMetrics and StreamJobMetrics disagree, a request_id replay returned
another job, or any call got INTERNAL or UNKNOWN; 2 when the run itself failed
(the JSON line then carries "error"). Stored points a client's stream did not
deliver within 10 s are counted as ``live_short_reads`` (a stall, reported only).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _auth import aio_channel, server_env
from grpc import aio
from recovery import job_config

from brightrun.v1 import dataset_service_pb2 as ds
from brightrun.v1 import dataset_service_pb2_grpc, job_pb2, job_service_pb2_grpc
from brightrun.v1 import job_service_pb2 as js
from tests.e2e.harness import process_state

REPO = Path(__file__).resolve().parent.parent
DATASET = REPO / "examples" / "data" / "support_chat.jsonl"
State = job_pb2.Job.State
TERMINAL = frozenset({State.STATE_COMPLETED, State.STATE_FAILED, State.STATE_CANCELLED})
#: Non-OK codes that are a correct answer to what the bench asked.
EXPECTED: dict[str, frozenset[str]] = {"CancelJob": frozenset({"FAILED_PRECONDITION"})}
FATAL_CODES = frozenset({"INTERNAL", "UNKNOWN"})
WEIGHTS: dict[str, int] = {
    "GetJob": 30,
    "ListJobs": 12,
    "ListJobs_filtered": 12,
    "StreamJobMetrics": 16,
    "CancelJob": 12,
    "CreateJob": 18,
}
RPC_TIMEOUT = 30.0
CHANNELS = 4


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))], 3)


def state_name(state: int) -> str:
    """QUEUED, TRAINING, ... for a Job.State number."""
    return State.Name(cast("job_pb2.Job.State.ValueType", state)).removeprefix("STATE_")


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# ---------------------------------------------------------------- processes


def start_server(work: Path, slots: int) -> tuple[subprocess.Popen[bytes], str]:
    ready = work / "port"
    env = server_env(
        BRIGHTRUN_LOG_LEVEL="WARNING",
        BRIGHTRUN_TRAINER_THREADS="1",
        BRIGHTRUN_STOP_GRACE_SECONDS="10",
    )
    out = open(work / "server.log", "wb")  # noqa: SIM115 - the server keeps writing to it
    proc = subprocess.Popen(
        [sys.executable, "-m", "brightrun_server", "--port", "0", "--data-dir", str(work / "data"),
         "--ready-file", str(ready), "--max-concurrent-jobs", str(slots)],
        env=env, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out.close()
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text().strip():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the BrightRun server did not start; see {work / 'server.log'}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{ready.read_text().strip()}"


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        log("the server did not stop within 30 s of SIGTERM; SIGKILL")
        proc.kill()
        proc.wait(10)


def run_processes(marker: str) -> list[tuple[int, bytes]]:
    """(pid, command line) of every live process whose command line contains `marker`."""
    found = []
    needle = marker.encode()
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if needle in raw and int(path.parent.name) != os.getpid():
            found.append((int(path.parent.name), raw))
    return found


_SPEC = re.compile(rb"/jobs/(job_[A-Za-z0-9]+)/attempts/(\d+)/spec\.json")


def find_trainers(marker: str) -> list[tuple[int, str, int]]:
    """(pid, job id, attempt) of this run's live trainer processes."""
    trainers = []
    for pid, raw in run_processes(marker):
        match = _SPEC.search(raw)
        if b"brightrun_trainer" in raw and match and process_state(pid) not in ("", "Z", "X"):
            trainers.append((pid, match.group(1).decode(), int(match.group(2))))
    return sorted(trainers)


def kill_leftovers(marker: str) -> int:
    """SIGKILL every process of this run still alive (trainers outlive a stopped server)."""
    killed = 0
    for _ in range(20):
        procs = run_processes(marker)
        if not procs:
            break
        for pid, _ in procs:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.2)
    return killed


def process_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[-1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- bookkeeping


@dataclass
class OpStats:
    latencies_ms: list[float] = field(default_factory=list)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    calls: int = 0


@dataclass
class Phase:
    name: str
    stats: dict[str, OpStats] = field(default_factory=lambda: collections.defaultdict(OpStats))
    start: float = 0.0
    seconds: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    loop_lag_ms: list[float] = field(default_factory=list)
    load_1m: list[float] = field(default_factory=list)

    def record(self, op: str, code: str, latency_ms: float | None) -> None:
        s = self.stats[op]
        s.calls += 1
        s.codes[code] += 1
        if latency_ms is not None:
            s.latencies_ms.append(latency_ms)

    def summary(self) -> dict[str, Any]:
        total = sum(s.calls for s in self.stats.values())
        per_op = {
            op: {
                "calls": s.calls,
                "per_s": round(s.calls / self.seconds, 2),
                "p50_ms": pct(s.latencies_ms, 0.50),
                "p99_ms": pct(s.latencies_ms, 0.99),
                "codes": dict(s.codes),
            }
            for op, s in sorted(self.stats.items())
        }
        return {
            "seconds": round(self.seconds, 1),
            "calls": total,
            "ops_per_s": round(total / self.seconds, 2),
            "per_op": per_op,
            "client_cpu_cores": round(self.client_cpu / self.seconds, 3),
            "server_cpu_cores": round(self.server_cpu / self.seconds, 3),
            "loop_lag_ms": {"p50": pct(self.loop_lag_ms, 0.5), "p99": pct(self.loop_lag_ms, 0.99)},
            "load_1m": {"mean": round(sum(self.load_1m) / len(self.load_1m), 2), "max": max(self.load_1m)}
            if self.load_1m
            else None,
        }


@dataclass
class JobInfo:
    id: str
    role: str
    created: float
    request_id: str = ""
    state: int = State.STATE_QUEUED
    version: int = -1
    last_seq: int = 0
    started_at: float | None = None


def point_kind(p: job_pb2.MetricPoint) -> str:
    if p.HasField("train_loss"):
        return "train"
    return "eval" if p.HasField("eval_loss") else "other"


def analyse(points: list[job_pb2.MetricPoint], last_seq: int) -> dict[str, int]:
    """Gaps, repeats and disorder of one read of a job's metrics."""
    seqs = [p.sequence for p in points]
    counts = collections.Counter(seqs)
    top = max(max(seqs, default=0), last_seq)
    unique = {p.sequence: p for p in points}.values()
    per_key = collections.Counter((p.attempt, p.step, point_kind(p)) for p in unique)
    attempts_per_step: dict[tuple[int, str], set[int]] = collections.defaultdict(set)
    for p in unique:
        attempts_per_step[(p.step, point_kind(p))].add(p.attempt)
    return {
        "points": len(points),
        "lost": sum(1 for s in range(1, top + 1) if s not in counts),
        "duplicated": sum(n - 1 for n in counts.values() if n > 1),
        "out_of_order": sum(1 for a, b in itertools.pairwise(seqs) if b <= a),
        "beyond_last_sequence": sum(1 for s in seqs if s > last_seq),
        "attempt_step_duplicates": sum(n - 1 for n in per_key.values() if n > 1),
        "redone_steps": sum(len(a) - 1 for a in attempts_per_step.values()),
    }


# ---------------------------------------------------------------- the soak


class Soak:
    def __init__(self, args: argparse.Namespace, address: str, marker: str, run_id: str) -> None:
        self.args = args
        self.address = address
        self.marker = marker
        self.run_id = run_id
        self.channels = [aio_channel(address) for _ in range(CHANNELS)]
        self.stubs = [job_service_pb2_grpc.JobServiceStub(c) for c in self.channels]
        self.harness_stub = self.stubs[0]
        self.dataset_id = ""
        self.model = ""
        self.jobs: dict[str, JobInfo] = {}
        self.created = 0
        self.tokens = 1.0
        self.refill_at = time.monotonic()
        self.running_cancel_at = time.monotonic()
        self.harness_codes: collections.Counter[str] = collections.Counter()
        self.stream_checks: collections.Counter[str] = collections.Counter()
        self.replays: collections.Counter[str] = collections.Counter()
        self.kills: list[dict[str, Any]] = []
        self.kills_missed = 0
        self.blocker_pids: list[int] = []
        self.phase_name = "setup"
        self.unexpected_samples: list[str] = []
        self.followers = 0
        self.background: set[asyncio.Task[None]] = set()
        self.soak_start = 0.0
        self.server_pid = 0

    async def close(self) -> None:
        for c in self.channels:
            await c.close(None)

    # -- job registry -----------------------------------------------------

    def observe(self, job: job_pb2.Job) -> None:
        info = self.jobs.get(job.id)
        if info is None:
            if job.labels.get("soak") != self.run_id:
                return
            info = self.jobs[job.id] = JobInfo(job.id, job.labels.get("role", "?"), time.monotonic())
        if job.version < info.version:
            return  # an older snapshot than one already seen
        info.version = job.version
        info.state = job.state
        info.last_seq = max(info.last_seq, job.last_metric_sequence)
        if job.attempt_count > 0 and info.started_at is None:
            info.started_at = time.monotonic()

    def in_state(self, *states: int) -> list[JobInfo]:
        return [j for j in self.jobs.values() if j.state in states]

    def queued(self) -> list[JobInfo]:
        return sorted(self.in_state(State.STATE_QUEUED), key=lambda j: j.created)

    def create_request(self, role: str, *, max_steps: int | None = None) -> js.CreateJobRequest:
        self.created += 1
        n = self.created
        return js.CreateJobRequest(
            request_id=f"soak-{self.run_id}-{n}",
            name=f"soak {role} {n}",
            dataset_id=self.dataset_id,
            base_model=self.model,
            overrides=job_config(max_steps or self.args.max_steps, 1000 + n, self.args.checkpoint_interval),
            labels={"soak": self.run_id, "role": role, "phase": self.phase_name},
            recovery_policy=job_pb2.RecoveryPolicy(max_system_retries=10),
            force=True,
        )

    # -- harness calls (not part of the measured mix) ---------------------

    async def harness(self, call: Awaitable[Any], expected: frozenset[str] = frozenset()) -> Any:
        try:
            return await call
        except aio.AioRpcError as e:
            if e.code().name in expected:
                return None
            self.harness_codes[e.code().name] += 1
            if e.code().name in FATAL_CODES:
                self.unexpected_samples.append(f"harness: {e.code().name}: {e.details()}")
            return None

    async def harness_create(self, role: str, max_steps: int | None = None) -> job_pb2.Job:
        request = self.create_request(role, max_steps=max_steps)
        job: job_pb2.Job = await self.harness_stub.CreateJob(request, timeout=RPC_TIMEOUT)
        self.jobs[job.id] = JobInfo(job.id, role, time.monotonic(), request.request_id)
        self.observe(job)
        return job

    async def cancel(self, job_id: str) -> None:
        request = js.CancelJobRequest(job_id=job_id, reason=job_pb2.CANCEL_REASON_TESTING, note="soak harness")
        job = await self.harness(self.harness_stub.CancelJob(request, timeout=RPC_TIMEOUT), EXPECTED["CancelJob"])
        if job is not None:
            self.observe(job)

    async def list_run_jobs(self, extra: str = "") -> list[job_pb2.Job]:
        jobs: list[job_pb2.Job] = []
        token = ""
        while True:
            request = js.ListJobsRequest(
                filter=f'labels.soak = "{self.run_id}"{extra}', page_size=1000, page_token=token
            )
            page = await self.harness(self.harness_stub.ListJobs(request, timeout=RPC_TIMEOUT))
            if page is None:
                return jobs
            jobs.extend(page.jobs)
            token = page.next_page_token
            if not token:
                return jobs

    async def refresh(self) -> None:
        """Update every unfinished job of the registry (one filtered list, GetJob for those that left it)."""
        open_jobs = await self.list_run_jobs(" AND state != COMPLETED AND state != FAILED AND state != CANCELLED")
        seen = set()
        for job in open_jobs:
            seen.add(job.id)
            self.observe(job)
        for info in list(self.jobs.values()):
            if info.state not in TERMINAL and info.id not in seen:
                job = await self.harness(self.harness_stub.GetJob(js.GetJobRequest(job_id=info.id), timeout=30))
                if job is not None:
                    self.observe(job)

    async def wait_terminal(self, job_id: str, limit: float) -> job_pb2.Job:
        deadline = time.monotonic() + limit
        while True:
            job: job_pb2.Job = await self.harness_stub.GetJob(js.GetJobRequest(job_id=job_id), timeout=30)
            self.observe(job)
            if job.state in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise RuntimeError(f"{job_id} still {State.Name(job.state)} after {limit:.0f} s")
            await asyncio.sleep(0.5)

    # -- measured operations --------------------------------------------

    async def timed(self, phase: Phase, op: str, call: Awaitable[Any]) -> tuple[Any, str]:
        t0 = time.perf_counter()
        try:
            result, code = await call, "OK"
        except aio.AioRpcError as e:
            result, code = None, e.code().name
            if code not in EXPECTED.get(op, ()) and len(self.unexpected_samples) < 20:
                self.unexpected_samples.append(f"{phase.name} {op}: {code}: {e.details()}")
        phase.record(op, code, (time.perf_counter() - t0) * 1000)
        return result, code

    def pick_job(self, rng: random.Random) -> JobInfo | None:
        if not self.jobs:
            return None
        active = [j for j in self.jobs.values() if j.state not in TERMINAL]
        pool = active if active and rng.random() < 0.5 else list(self.jobs.values())
        return rng.choice(pool)

    async def op_get(self, phase: Phase, stub: Any, rng: random.Random, last: dict[str, Any]) -> bool:
        info = self.pick_job(rng)
        if info is None:
            return False
        job, _ = await self.timed(phase, "GetJob", stub.GetJob(js.GetJobRequest(job_id=info.id), timeout=RPC_TIMEOUT))
        if job is not None:
            self.observe(job)
        return True

    async def op_list(self, phase: Phase, stub: Any, rng: random.Random, last: dict[str, Any]) -> bool:
        request = js.ListJobsRequest(page_size=20)
        await self.timed(phase, "ListJobs", stub.ListJobs(request, timeout=RPC_TIMEOUT))
        return True

    async def op_list_filtered(self, phase: Phase, stub: Any, rng: random.Random, last: dict[str, Any]) -> bool:
        flt = rng.choice(
            [
                f'labels.soak = "{self.run_id}"',
                "state = TRAINING",
                f'state = QUEUED AND labels.soak = "{self.run_id}"',
                "state = COMPLETED",
            ]
        )
        request = js.ListJobsRequest(page_size=20, filter=flt)
        await self.timed(phase, "ListJobs_filtered", stub.ListJobs(request, timeout=RPC_TIMEOUT))
        return True

    async def op_create(self, phase: Phase, stub: Any, rng: random.Random, last: dict[str, Any]) -> bool:
        if "request" in last and rng.random() < 0.1:
            request, expected_id = last["request"], last["job_id"]
            job, _ = await self.timed(phase, "CreateJob_replay", stub.CreateJob(request, timeout=RPC_TIMEOUT))
            if job is not None:
                self.replays["same_job" if job.id == expected_id else "different_job"] += 1
            return True
        now = time.monotonic()
        self.tokens = min(2.0, self.tokens + (now - self.refill_at) * self.args.create_rate)
        self.refill_at = now
        if self.tokens < 1.0 or len(self.queued()) > self.args.max_queued:
            return False
        self.tokens -= 1.0
        request = self.create_request("client")
        job, _ = await self.timed(phase, "CreateJob", stub.CreateJob(request, timeout=RPC_TIMEOUT))
        if job is not None:
            self.jobs.setdefault(job.id, JobInfo(job.id, "client", time.monotonic(), request.request_id))
            self.observe(job)
            last["request"], last["job_id"] = request, job.id
        return True

    async def op_cancel(self, phase: Phase, stub: Any, rng: random.Random, last: dict[str, Any]) -> bool:
        queued = self.queued()
        now = time.monotonic()
        training = [
            j
            for j in self.in_state(State.STATE_TRAINING)
            if j.started_at is not None and now - j.started_at > 20 and j.role != "seed"
        ]
        finished = self.in_state(*TERMINAL)
        if len(queued) > self.args.max_queued:
            # Bound the queue: mostly the newest job (so older ones get to train), sometimes
            # the oldest, which races with the scheduler claiming it.
            target = queued[0] if rng.random() < 0.2 else queued[-1]
        elif training and now - self.running_cancel_at > self.args.cancel_running_every:
            self.running_cancel_at = now
            target = rng.choice(training)
        elif finished:
            target = rng.choice(finished)  # FAILED_PRECONDITION unless it was cancelled
        else:
            return False
        request = js.CancelJobRequest(job_id=target.id, reason=job_pb2.CANCEL_REASON_TESTING, note="soak")
        job, _ = await self.timed(phase, "CancelJob", stub.CancelJob(request, timeout=RPC_TIMEOUT))
        if job is not None:
            self.observe(job)
        return True

    async def read_stream(
        self, stub: Any, job_id: str, start: int, window: float, limit: int
    ) -> tuple[list[int], float | None, str, bool]:
        """Read up to `limit` points for up to `window` seconds: (sequences, seconds to the
        first point, status code, whether the stream ended by itself)."""
        call = stub.StreamJobMetrics(js.StreamJobMetricsRequest(job_id=job_id, from_sequence=start), timeout=60)
        t0 = time.perf_counter()
        first: float | None = None
        seqs: list[int] = []
        code, ended = "OK", False
        try:
            async with asyncio.timeout(window):
                async for response in call:
                    if first is None:
                        first = time.perf_counter() - t0
                    seqs.append(response.metric.sequence)
                    if len(seqs) >= limit:
                        break
                else:
                    ended = True
        except TimeoutError:
            pass
        except aio.AioRpcError as e:
            code = e.code().name
        finally:
            call.cancel()
        return seqs, first, code, ended

    def check_continuity(self, seqs: list[int], expected: int) -> int:
        """Count gaps and repeats in `seqs`, which should run on from `expected`; returns the next expected."""
        for s in seqs:
            if s > expected:
                self.stream_checks["gaps"] += s - expected
            elif s < expected:
                self.stream_checks["duplicates"] += 1
            expected = max(expected, s + 1)
        return expected

    async def backlog_read(self, phase: Phase, stub: Any, job_id: str, start: int, count: int) -> int:
        """Read `count` stored points from `start` (all backlog: the time to the first point
        is the server's latency); returns how many arrived."""
        seqs, first, code, _ = await self.read_stream(stub, job_id, start, 10.0, count)
        phase.record("StreamJobMetrics", code, first * 1000 if first is not None else None)
        self.stream_checks["reads"] += 1
        self.stream_checks["points_read"] += len(seqs)
        if code != "OK":
            if len(self.unexpected_samples) < 20:
                self.unexpected_samples.append(f"{phase.name} StreamJobMetrics: {code}")
            return 0
        if len(seqs) < count:
            self.stream_checks["short_reads"] += 1  # stored points not delivered within 10 s
        self.check_continuity(seqs, start)
        return len(seqs)

    async def follow(self, phase: Phase, stub: Any, info: JobInfo, window: float) -> None:
        """Follow a running job's live points for a while (in the background: it mostly waits)."""
        start = info.last_seq + 1
        try:
            seqs, _, code, _ = await self.read_stream(stub, info.id, start, window, 10_000)
            phase.record("StreamJobMetrics_follow", code, None)
            self.stream_checks["follows"] += 1
            self.stream_checks["points_followed"] += len(seqs)
            if code == "OK":
                self.check_continuity(seqs, start)
        finally:
            self.followers -= 1

    async def op_stream(self, phase: Phase, stub: Any, rng: random.Random, last: dict[str, Any]) -> bool:
        candidates = [j for j in self.jobs.values() if j.last_seq > 0]
        if not candidates:
            return False
        info = rng.choice(candidates)
        if info.state not in TERMINAL and self.followers < self.args.clients // 5 and rng.random() < 0.25:
            self.followers += 1
            task = asyncio.create_task(self.follow(phase, stub, info, rng.uniform(2.0, 6.0)))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
            return True
        # A read from 0 or a random stored sequence, then a resume from the last point
        # received + 1, as a client does after a disconnect.
        start = 1 if rng.random() < 0.3 else rng.randint(1, info.last_seq)
        backlog = info.last_seq - start + 1
        cut = rng.randint(1, min(backlog, 200))
        got = await self.backlog_read(phase, stub, info.id, start, cut)
        if got == cut and cut < backlog:
            self.stream_checks["resumes"] += 1
            await self.backlog_read(phase, stub, info.id, start + cut, min(backlog - cut, 200))
        return True

    OPS: dict[str, str] = {
        "GetJob": "op_get",
        "ListJobs": "op_list",
        "ListJobs_filtered": "op_list_filtered",
        "StreamJobMetrics": "op_stream",
        "CancelJob": "op_cancel",
        "CreateJob": "op_create",
    }

    async def client(self, index: int, phase: Phase, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.args.seed}-{phase.name}-{index}")
        stub = self.stubs[index % len(self.stubs)]
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        last: dict[str, Any] = {}
        await asyncio.sleep(rng.uniform(0, self.args.think_ms / 1000))
        while not stop.is_set():
            for _ in range(6):
                op = rng.choices(names, weights)[0]
                handler: Callable[..., Awaitable[bool]] = getattr(self, self.OPS[op])
                if await handler(phase, stub, rng, last):
                    break
            else:
                await self.op_list(phase, stub, rng, last)
            await asyncio.sleep(rng.uniform(0, 2 * self.args.think_ms / 1000))

    # -- background tasks -----------------------------------------------

    async def tracker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh()
            await asyncio.sleep(1.0)

    async def lag_monitor(self, phase: Phase, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.05)
            phase.loop_lag_ms.append((time.perf_counter() - t - 0.05) * 1000)

    async def reporter(self, phase: Phase, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(5)
            phase.load_1m.append(os.getloadavg()[0])
            calls = sum(s.calls for s in phase.stats.values())
            elapsed = time.perf_counter() - phase.start
            states = collections.Counter(state_name(j.state) for j in self.jobs.values())
            log(
                f"{phase.name} {elapsed:5.0f}s: {calls} calls ({calls / elapsed:.0f}/s), "
                f"{len(self.kills)} kills, jobs {dict(states)}, load {os.getloadavg()[0]:.2f}"
            )

    async def injector(self, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.args.seed}-faults")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), rng.uniform(self.args.kill_min, self.args.kill_max))
                return
            except TimeoutError:
                pass
            sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
            pick = rng.random()
            trainers = await asyncio.to_thread(find_trainers, self.marker)
            if not trainers:
                self.kills_missed += 1
                log("fault: no trainer running")
                continue
            pid, job_id, attempt = trainers[int(pick * len(trainers))]
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                self.kills_missed += 1
                continue
            info = self.jobs.get(job_id)
            self.kills.append(
                {
                    "t": round(time.perf_counter() - self.soak_start, 1),
                    "job": job_id,
                    "attempt": attempt,
                    "signal": sig.name,
                    "state": state_name(info.state) if info else "?",
                }
            )
            log(f"fault: {sig.name} -> {job_id} attempt {attempt} (pid {pid})")

    async def run_phase(self, phase: Phase, duration: float, *, inject: bool) -> None:
        self.phase_name = phase.name
        stop = asyncio.Event()
        server_cpu0, client_cpu0 = process_cpu_seconds(self.server_pid), own_cpu_seconds()
        phase.start = self.soak_start = time.perf_counter()
        tasks = [asyncio.create_task(self.client(i, phase, stop)) for i in range(self.args.clients)]
        helpers = [
            asyncio.create_task(self.tracker(stop)),
            asyncio.create_task(self.lag_monitor(phase, stop)),
            asyncio.create_task(self.reporter(phase, stop)),
        ]
        if inject:
            helpers.append(asyncio.create_task(self.injector(stop)))
        await asyncio.sleep(duration)
        stop.set()
        phase.seconds = time.perf_counter() - phase.start
        phase.client_cpu = own_cpu_seconds() - client_cpu0
        phase.server_cpu = process_cpu_seconds(self.server_pid) - server_cpu0
        done, pending = await asyncio.wait(tasks + helpers + list(self.background), timeout=90)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise RuntimeError(f"a {phase.name} task failed") from task.exception()
        if pending:
            log(f"{len(pending)} tasks did not stop within 90 s of the end of {phase.name}")

    # -- setup, drain and verification ------------------------------------

    async def upload(self) -> None:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(self.channels[0])
        data = DATASET.read_bytes()

        async def chunks() -> AsyncIterator[ds.UploadDatasetRequest]:
            yield ds.UploadDatasetRequest(metadata=ds.UploadDatasetMetadata(filename=DATASET.name))
            yield ds.UploadDatasetRequest(chunk=data)

        dataset = await stub.UploadDataset(chunks(), timeout=120)
        self.dataset_id = dataset.id

    async def hold_slots(self, slots: int) -> None:
        """Fill every slot with a job whose trainer is stopped at birth (no CPU)."""
        for _ in range(slots):
            job = await self.harness_create("blocker")
            marker = f"{job.id}/attempts/1/spec.json"
            deadline = time.monotonic() + 60
            while True:
                found = [pid for pid, _, _ in await asyncio.to_thread(find_trainers, marker)]
                if found:
                    os.kill(found[0], signal.SIGSTOP)
                    self.blocker_pids.append(found[0])
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"blocker {job.id} never started a trainer")
                await asyncio.sleep(0.005)
        log(f"slots held by stopped trainers {self.blocker_pids}")

    def release_slots(self) -> None:
        for pid in self.blocker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.blocker_pids = []

    async def drain(self, limit: float) -> dict[str, Any]:
        """Cancel what waits, give running jobs `limit` seconds to finish, cancel the rest."""
        await self.refresh()
        for info in self.queued() + self.in_state(State.STATE_AWAITING_DECISION, State.STATE_PAUSED):
            await self.cancel(info.id)
        t0 = time.monotonic()
        deadline = t0 + limit
        while time.monotonic() < deadline:
            await self.refresh()
            open_jobs = [j for j in self.jobs.values() if j.state not in TERMINAL]
            if not open_jobs:
                break
            for info in self.in_state(State.STATE_QUEUED, State.STATE_AWAITING_DECISION):
                await self.cancel(info.id)
            await asyncio.sleep(1.0)
        leftover = [j.id for j in self.jobs.values() if j.state not in TERMINAL]
        log(f"drain: {len(leftover)} jobs still open after {time.monotonic() - t0:.0f} s")
        for job_id in leftover:
            await self.cancel(job_id)
        hung = []
        for job_id in leftover:
            try:
                await self.wait_terminal(job_id, 120)
            except RuntimeError as e:
                hung.append(str(e))
        return {"seconds": round(time.monotonic() - t0, 1), "cancelled_at_deadline": len(leftover), "hung": hung}

    async def stream_all(self, job_id: str) -> list[job_pb2.MetricPoint]:
        points = []
        request = js.StreamJobMetricsRequest(job_id=job_id, from_sequence=0)
        async with asyncio.timeout(120):
            async for response in self.harness_stub.StreamJobMetrics(request, timeout=120):
                points.append(response.metric)
        return points

    async def list_all(self, job_id: str) -> list[job_pb2.MetricPoint]:
        points: list[job_pb2.MetricPoint] = []
        token = ""
        while True:
            request = js.ListJobMetricsRequest(job_id=job_id, page_size=37, page_token=token)
            page = await self.harness_stub.ListJobMetrics(request, timeout=RPC_TIMEOUT)
            points.extend(page.metrics)
            token = page.next_page_token
            if not token:
                return points

    async def verify(self) -> dict[str, Any]:
        jobs = await self.list_run_jobs()
        totals: collections.Counter[str] = collections.Counter()
        problems: list[dict[str, Any]] = []
        outcomes: collections.Counter[str] = collections.Counter()
        failures: collections.Counter[str] = collections.Counter()
        interruptions = recovered = attempts = started = 0
        downtimes: list[float] = []
        steps_lost: list[int] = []
        for job in jobs:
            outcomes[State.Name(job.state).removeprefix("STATE_").lower()] += 1
            if job.state == State.STATE_FAILED:
                failures[job_pb2.FailureClass.Name(job.failure.failure_class)] += 1
            attempts += job.attempt_count
            started += job.attempt_count > 0
            interruptions += len(job.interruptions)
            recovered += sum(1 for i in job.interruptions if i.recovered)
            for i in job.interruptions:
                if i.recovered:
                    downtimes.append(i.downtime.ToTimedelta().total_seconds())
                    steps_lost.append(i.steps_lost)
            try:
                listed = await self.list_all(job.id)
                streamed = await self.stream_all(job.id)
            except (aio.AioRpcError, TimeoutError) as e:
                totals["read_errors"] += 1
                problems.append({"job": job.id, "error": repr(e)})
                continue
            a = analyse(listed, job.last_metric_sequence)
            b = analyse(streamed, job.last_metric_sequence)
            mismatch = [p.SerializeToString() for p in listed] != [p.SerializeToString() for p in streamed]
            totals["points"] += a["points"]
            totals["redone_steps"] += a["redone_steps"]
            for key in ("lost", "duplicated", "out_of_order", "beyond_last_sequence", "attempt_step_duplicates"):
                totals[f"list_{key}"] += a[key]
                totals[f"stream_{key}"] += b[key]
            totals["list_stream_mismatches"] += mismatch
            bad = any(a[k] or b[k] for k in ("lost", "duplicated", "out_of_order", "attempt_step_duplicates"))
            if bad or mismatch:
                problems.append(
                    {"job": job.id, "last_metric_sequence": job.last_metric_sequence, "list": a, "stream": b}
                )
        return {
            "jobs": len(jobs),
            "outcomes": dict(outcomes),
            "failure_classes": dict(failures),
            "started": started,
            "attempts": attempts,
            "interruptions_recorded": interruptions,
            "interruptions_recovered": recovered,
            "recovery_downtime_s": {"p50": pct(downtimes, 0.5), "max": max(downtimes, default=None)},
            "steps_lost_max": max(steps_lost, default=None),
            "checks": dict(totals),
            "problems": problems[:20],
        }


def server_log_errors(path: Path) -> dict[str, int]:
    """Error and critical records of the server's (JSON) log, by logger, message and exception."""
    found: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if "Traceback" in line or "ERROR" in line:
                found[line[:200]] += 1
            continue
        if not isinstance(record, dict) or str(record.get("level", "")).lower() not in ("error", "critical"):
            continue
        exception = str(record.get("exception", "")).strip().splitlines()
        found[f"{record.get('logger')}: {record.get('message')} | {exception[-1] if exception else ''}"[:300]] += 1
    return dict(found)


# ---------------------------------------------------------------- main


async def soak_run(args: argparse.Namespace, work: Path, model: str, result: dict[str, Any]) -> None:
    marker = str(work)
    proc, address = await asyncio.to_thread(start_server, work, args.slots)
    run_id = work.name.rsplit("-", 1)[-1].lower().replace("_", "")
    soak = Soak(args, address, marker, run_id)
    soak.server_pid = proc.pid
    soak.model = model
    log(f"server pid {proc.pid} on {address}; run {run_id}")
    try:
        await soak.upload()
        t = time.monotonic()
        seed_job = await soak.harness_create("seed", max_steps=args.seed_steps)
        seed_done = await soak.wait_terminal(seed_job.id, 600)
        result["seed_job"] = {
            "state": State.Name(seed_done.state),
            "seconds": round(time.monotonic() - t, 1),
            "metrics": seed_done.last_metric_sequence,
        }
        log(f"seed job {State.Name(seed_done.state)} in {time.monotonic() - t:.0f} s")
        if seed_done.state != State.STATE_COMPLETED:
            raise RuntimeError(f"the seed job did not complete: {seed_done.state_message}")

        await soak.hold_slots(args.slots)
        load_start = os.getloadavg()
        quiet = Phase("quiet")
        log(f"quiet phase: {args.quiet:.0f} s, {args.clients} clients, no training, no faults")
        await soak.run_phase(quiet, args.quiet, inject=False)
        load_after_quiet = os.getloadavg()
        await soak.refresh()
        for info in soak.queued():
            await soak.cancel(info.id)
        soak.release_slots()

        log(f"soak phase: {args.duration:.0f} s, kills every {args.kill_min:.0f}-{args.kill_max:.0f} s")
        phase = Phase("soak")
        await soak.run_phase(phase, args.duration, inject=True)
        load_end = os.getloadavg()
        log("draining...")
        drain = await soak.drain(args.drain_timeout)
        log("verifying metrics...")
        verified = await soak.verify()
    finally:
        soak.release_slots()
        await soak.close()
        await asyncio.to_thread(stop_server, proc)
        leftovers = await asyncio.to_thread(kill_leftovers, marker)
        if leftovers:
            log(f"killed {leftovers} leftover processes")

    server_errors = server_log_errors(work / "server.log")
    for message, n in server_errors.items():
        log(f"server log, {n} x: {message}")

    q, s = quiet.summary(), phase.summary()
    unexpected: collections.Counter[str] = collections.Counter()
    expected: collections.Counter[str] = collections.Counter()
    for name, p in (("quiet", quiet), ("soak", phase)):
        for op, st in p.stats.items():
            for code, n in st.codes.items():
                if code == "OK":
                    continue
                target = expected if code in EXPECTED.get(op, ()) else unexpected
                target[f"{name}:{op}:{code}"] += n
    for code, n in soak.harness_codes.items():
        unexpected[f"harness:{code}"] += n
    fatal = sum(n for key, n in unexpected.items() if key.rsplit(":", 1)[-1] in FATAL_CODES)
    checks = verified["checks"]
    lost = checks.get("list_lost", 0) + checks.get("stream_lost", 0) + soak.stream_checks["gaps"]
    duplicated = (
        checks.get("list_duplicated", 0) + checks.get("stream_duplicated", 0) + soak.stream_checks["duplicates"]
    )
    other_bad = (
        checks.get("list_attempt_step_duplicates", 0)
        + checks.get("list_out_of_order", 0)
        + checks.get("list_stream_mismatches", 0)
        + checks.get("read_errors", 0)
        + soak.replays["different_job"]
    )
    kills_by_signal = collections.Counter(k["signal"] for k in soak.kills)
    outcomes = verified["outcomes"]
    result.update(
        {
            "throughput_ratio": ratio(s["ops_per_s"], q["ops_per_s"]),
            "p99_ratio": {
                op: ratio(s["per_op"][op]["p99_ms"], q["per_op"].get(op, {}).get("p99_ms")) for op in s["per_op"]
            },
            "ops_per_s": {"quiet": q["ops_per_s"], "soak": s["ops_per_s"]},
            "quiet": q,
            "soak": s,
            "errors": {
                "expected": dict(expected),
                "unexpected": dict(unexpected),
                "internal_or_unknown": fatal,
                "expected_means": {"CancelJob:FAILED_PRECONDITION": "cancelling a job that already ended"},
                "samples": soak.unexpected_samples[:10],
            },
            "kills": {
                "total": len(soak.kills),
                "SIGKILL": kills_by_signal["SIGKILL"],
                "SIGTERM": kills_by_signal["SIGTERM"],
                "no_target_or_gone": soak.kills_missed,
                "log": soak.kills,
            },
            "jobs": {
                "created": verified["jobs"],
                "started": verified["started"],
                "completed": outcomes.get("completed", 0),
                "cancelled": outcomes.get("cancelled", 0),
                "failed": outcomes.get("failed", 0),
                "other": {k: v for k, v in outcomes.items() if k not in ("completed", "cancelled", "failed")},
                "failure_classes": verified["failure_classes"],
                "attempts": verified["attempts"],
                "interruptions_recorded": verified["interruptions_recorded"],
                "interruptions_recovered": verified["interruptions_recovered"],
                "recovery_downtime_s": verified["recovery_downtime_s"],
                "steps_lost_max": verified["steps_lost_max"],
                "create_replays": dict(soak.replays),
            },
            "drain": drain,
            "lost_metrics": lost,
            "duplicated_metrics": duplicated,
            "metric_checks": {**checks, **{f"live_{k}": v for k, v in soak.stream_checks.items()}},
            "metric_problems": verified["problems"],
            "load_average": {
                "start": [round(x, 2) for x in load_start],
                "after_quiet": [round(x, 2) for x in load_after_quiet],
                "end": [round(x, 2) for x in load_end],
            },
            "server_log_errors": server_errors,
        }
    )
    result["ok"] = lost == 0 and duplicated == 0 and fatal == 0 and other_bad == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=None, help="seconds of the soak phase (300; 60 with --quick)")
    parser.add_argument("--quiet", type=float, default=None, help="seconds of the quiet baseline (15; 10 with --quick)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (50; 10 with --quick)")
    parser.add_argument("--seed", type=int, default=7, help="seeds the client mix and the fault plan")
    parser.add_argument("--think-ms", type=float, default=400.0, help="mean pause of a client between calls")
    parser.add_argument("--slots", type=int, default=2, help="the server's --max-concurrent-jobs")
    parser.add_argument("--max-steps", type=int, default=120, help="optimiser steps of each job")
    parser.add_argument("--seed-steps", type=int, default=20, help="optimiser steps of the seed job")
    parser.add_argument("--checkpoint-interval", type=int, default=5)
    parser.add_argument("--create-rate", type=float, default=1.0, help="jobs created a second, at most")
    parser.add_argument("--max-queued", type=int, default=2, help="queued jobs above this are cancelled, oldest first")
    parser.add_argument(
        "--cancel-running-every", type=float, default=45.0, help="seconds between cancels of a training job"
    )
    parser.add_argument("--kill-min", type=float, default=10.0)
    parser.add_argument("--kill-max", type=float, default=20.0)
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="seconds running jobs get to finish")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server and trainer logs)")
    parser.add_argument("--quick", action="store_true", help="60 s soak, 10 clients, 10 s baseline")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 60.0 if args.quick else 300.0
    args.quiet = args.quiet if args.quiet is not None else (10.0 if args.quick else 15.0)
    args.clients = args.clients if args.clients is not None else (10 if args.quick else 50)

    from brightrun_trainer.tiny import build_tiny_model

    result: dict[str, Any] = {
        "bench": "soak",
        "quick": args.quick,
        "duration_s": args.duration,
        "quiet_s": args.quiet,
        "clients": args.clients,
        "seed": args.seed,
        "think_ms": args.think_ms,
        "offered_ops_per_s_max": round(args.clients / (args.think_ms / 1000), 1),
        "max_concurrent_jobs": args.slots,
        "max_steps": args.max_steps,
        "checkpoint_interval_steps": args.checkpoint_interval,
        "create_rate_per_s": args.create_rate,
        "kill_every_s": [args.kill_min, args.kill_max],
        "cpus": os.cpu_count(),
    }
    work = Path(tempfile.mkdtemp(prefix="brightrun-soak-"))
    started = time.monotonic()
    try:
        log(f"work dir {work}; building the tiny model...")
        model = str(build_tiny_model(work / "model"))
        asyncio.run(soak_run(args, work, model, result))
    except Exception as e:
        traceback.print_exc()
        result.update(ok=False, error=repr(e))
    finally:
        kill_leftovers(str(work))
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    if "error" in result:
        print(json.dumps(result))
        return 2
    log(
        f"soak {result['ops_per_s']['soak']} ops/s vs quiet {result['ops_per_s']['quiet']} "
        f"(ratio {result['throughput_ratio']}); kills {result['kills']['total']}; "
        f"lost {result['lost_metrics']}, duplicated {result['duplicated_metrics']}; "
        f"INTERNAL/UNKNOWN {result['errors']['internal_or_unknown']}; ok {result['ok']}"
    )
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
