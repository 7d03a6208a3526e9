"""Fault injection against a real BrightRun server running real trainers.

Nothing here imports pytest, so ``bench/recovery.py`` uses the same code:

* :class:`Api` — raw gRPC stubs with the few calls the fault tests need
  (upload, create, wait, every stored metric point and event);
* :func:`trainer_pid` — the pid of a job attempt's trainer process, found by
  the spec path on its command line (``{job_id}/attempts/{n}/spec.json``);
* :class:`Interrupter` — follows a job's live metric stream and, when the
  current attempt reports a chosen step, hits its trainer with a fault
  (SIGKILL, SIGTERM, or anything else a :data:`Fault` does);
* :func:`final_curve` — the per-step train losses a job ends with (for each
  step the point of the latest attempt that reported it);
* :class:`FlakyProxy` — a TCP proxy for the trainers' report channel that can
  refuse or drop connections for a while;
* :class:`PeakMemory` — samples a process's peak virtual size and RSS.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import signal
import socket
import string
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from brightrun.v1 import (
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

State = job_pb2.Job.State
TERMINAL = frozenset({State.STATE_COMPLETED, State.STATE_FAILED, State.STATE_CANCELLED})


# ---------------------------------------------------------------- the API


@dataclass
class Api:
    """Raw stubs of one server; the SDK is deliberately not used here."""

    channel: grpc.Channel
    datasets: dataset_service_pb2_grpc.DatasetServiceStub
    jobs: job_service_pb2_grpc.JobServiceStub

    @classmethod
    def connect(cls, address: str, api_key: str | None = None) -> Api:
        """Stubs on a new channel; every call carries ``api_key`` as a bearer token when given."""
        channel = grpc.insecure_channel(address)
        if api_key:
            channel = grpc.intercept_channel(channel, BearerAuth(api_key))
        return cls.over(channel)

    @classmethod
    def over(cls, channel: grpc.Channel) -> Api:
        """Stubs on an existing (e.g. already authenticated) channel."""
        return cls(
            channel,
            dataset_service_pb2_grpc.DatasetServiceStub(channel),
            job_service_pb2_grpc.JobServiceStub(channel),
        )

    def close(self) -> None:
        self.channel.close()

    def upload(self, path: Path) -> dataset_pb2.Dataset:
        data = path.read_bytes()

        def requests() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
            yield dataset_service_pb2.UploadDatasetRequest(
                metadata=dataset_service_pb2.UploadDatasetMetadata(filename=path.name)
            )
            for i in range(0, len(data), 1 << 16):
                yield dataset_service_pb2.UploadDatasetRequest(chunk=data[i : i + (1 << 16)])

        dataset: dataset_pb2.Dataset = self.datasets.UploadDataset(requests(), timeout=120)
        return dataset

    def create(
        self, dataset_id: str, base_model: str, config: job_pb2.TrainingConfig, *, name: str = ""
    ) -> job_pb2.Job:
        """Create a job; ``force``, since fault runs deliberately train one configuration several times."""
        request = job_service_pb2.CreateJobRequest(
            dataset_id=dataset_id, base_model=base_model, overrides=config, name=name, force=True
        )
        job: job_pb2.Job = self.jobs.CreateJob(request, timeout=60)
        return job

    def get(self, job_id: str) -> job_pb2.Job:
        job: job_pb2.Job = self.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id), timeout=30)
        return job

    def wait(self, job_id: str, states: frozenset[int] = TERMINAL, timeout: float = 240) -> job_pb2.Job:
        """Poll until the job is in one of ``states``."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.state in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {State.Name(job.state)} after {timeout:.0f}s: {job.state_message}"
                )
            time.sleep(0.05)

    def metrics(self, job_id: str) -> list[job_pb2.MetricPoint]:
        """Every stored metric point, in sequence order (all pages)."""
        points: list[job_pb2.MetricPoint] = []
        token = ""
        while True:
            page = self.jobs.ListJobMetrics(
                job_service_pb2.ListJobMetricsRequest(job_id=job_id, page_size=10000, page_token=token), timeout=60
            )
            points.extend(page.metrics)
            token = page.next_page_token
            if not token:
                return points

    def events(self, job_id: str, query: str = "") -> list[job_pb2.JobEvent]:
        """Every stored event (whose code or message contains ``query``), in sequence order."""
        events: list[job_pb2.JobEvent] = []
        token = ""
        while True:
            page = self.jobs.ListJobEvents(
                job_service_pb2.ListJobEventsRequest(job_id=job_id, page_size=1000, page_token=token, query=query),
                timeout=60,
            )
            events.extend(page.events)
            token = page.next_page_token
            if not token:
                return events

    def coded(self, job_id: str, code: str) -> list[job_pb2.JobEvent]:
        return [e for e in self.events(job_id, query=code) if e.code == code]

    def state_path(self, job_id: str) -> list[str]:
        """The states the job went through, from its STATE_CHANGED events."""
        return [str(e.payload["to"]) for e in self.coded(job_id, "STATE_CHANGED")]


class BearerAuth(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call."""

    def __init__(self, api_key: str) -> None:
        self._metadata = ("authorization", f"Bearer {api_key}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ["method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"]
    ),
    grpc.ClientCallDetails,
):
    pass


def new_api_key() -> str:
    """A random key in the server's ``brk_<12>_<40>`` form (for --bootstrap-api-key style provisioning)."""
    lower = string.ascii_lowercase + string.digits
    both = string.ascii_letters + string.digits
    rng = secrets.SystemRandom()
    return f"brk_{''.join(rng.choice(lower) for _ in range(12))}_{''.join(rng.choice(both) for _ in range(40))}"


# ---------------------------------------------------------------- processes


def trainer_pid(job_id: str, attempt: int, timeout: float = 60) -> int:
    """The pid of the trainer running ``attempt`` of ``job_id`` (found by its spec path)."""
    marker = f"{job_id}/attempts/{attempt}/spec.json".encode()
    deadline = time.monotonic() + timeout
    while True:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if marker in cmdline.read_bytes():
                    return int(cmdline.parent.name)
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise AssertionError(f"no trainer process for {job_id} attempt {attempt}")
        time.sleep(0.02)


def process_state(pid: int) -> str:
    """The one-letter state of a process (R, S, T, Z...), or "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return ""


def wait_stopped(pid: int, timeout: float = 10) -> None:
    """Wait until a SIGSTOPped process is really stopped (state T)."""
    deadline = time.monotonic() + timeout
    while process_state(pid) not in ("T", "t"):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop (state {process_state(pid)!r})")
        time.sleep(0.005)


class PeakMemory:
    """Samples a process's VmPeak (peak virtual size, what RLIMIT_AS limits) and
    VmHWM (peak RSS) from /proc until it exits; the kernel keeps both as
    high-water marks, so the last sample is the peak up to that moment."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.vm_peak = 0
        self.vm_hwm = 0
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name=f"peak-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if fields["State"].split()[0] in ("Z", "X"):
                    return
                self.vm_peak = max(self.vm_peak, int(fields["VmPeak"].split()[0]) * 1024)
                self.vm_hwm = max(self.vm_hwm, int(fields["VmHWM"].split()[0]) * 1024)
            except (OSError, KeyError, ValueError, IndexError):
                return
            time.sleep(self._interval)

    def join(self, timeout: float = 240) -> PeakMemory:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"process {self.pid} still running after {timeout:.0f}s")
        return self


# ---------------------------------------------------------------- faults


#: A fault: called with the trainer's pid and attempt number while that attempt
#: trains. It must end the attempt one way or another.
Fault = Callable[[int, int], None]


def sigkill(pid: int, attempt: int) -> None:
    del attempt
    os.kill(pid, signal.SIGKILL)


def sigterm(pid: int, attempt: int) -> None:
    del attempt
    os.kill(pid, signal.SIGTERM)


@dataclass(frozen=True)
class Injected:
    """One fault as the test injected it."""

    attempt: int
    #: The step the attempt had reported when the fault was injected.
    observed_step: int
    signal_name: str
    #: Wall clock (time.time()) just before the fault.
    at: float


@dataclass
class Interrupter:
    """Follows a job's metric stream and injects a fault into the running
    attempt each time it reports a train step at or beyond the next target.

    ``plan`` holds (target step, fault, name) in order; after a fault the next
    target applies to the next attempt only (points the dead attempt left in
    its outbox arrive late and are ignored). :meth:`run` returns when the job
    is terminal and its stream has ended.
    """

    api: Api
    job_id: str
    plan: list[tuple[int, Fault, str]]
    timeout: float = 300
    injected: list[Injected] = field(default_factory=list)
    points: list[job_pb2.MetricPoint] = field(default_factory=list)
    #: The first train point of each attempt after the first: attempt -> point.
    first_points: dict[int, job_pb2.MetricPoint] = field(default_factory=dict)

    def run(self) -> Interrupter:
        todo = list(self.plan)
        last_faulted = 0
        stream = self.api.jobs.StreamJobMetrics(
            job_service_pb2.StreamJobMetricsRequest(job_id=self.job_id), timeout=self.timeout
        )
        for response in stream:
            point = response.metric
            self.points.append(point)
            if not point.HasField("train_loss") or point.attempt <= last_faulted:
                continue
            if point.attempt > 1 and point.attempt not in self.first_points:
                self.first_points[point.attempt] = point
            if todo and point.step >= todo[0][0]:
                _, fault, name = todo.pop(0)
                pid = trainer_pid(self.job_id, point.attempt, timeout=10)
                self.injected.append(Injected(point.attempt, point.step, name, time.time()))
                fault(pid, point.attempt)
                last_faulted = point.attempt
        if todo:
            raise AssertionError(f"job {self.job_id} ended before the faults at steps {[t for t, _, _ in todo]}")
        return self


# ---------------------------------------------------------------- curves


def train_points(points: list[job_pb2.MetricPoint]) -> list[tuple[int, int, float]]:
    """(attempt, step, train loss) of every point with a train loss."""
    return [(p.attempt, p.step, p.train_loss) for p in points if p.HasField("train_loss")]


def final_curve(points: list[job_pb2.MetricPoint]) -> dict[int, float]:
    """step -> train loss, taking for each step the point of the latest attempt."""
    curve: dict[int, tuple[int, float]] = {}
    for attempt, step, loss in train_points(points):
        if step not in curve or attempt >= curve[step][0]:
            curve[step] = (attempt, loss)
    return {step: loss for step, (_, loss) in sorted(curve.items())}


def eval_curve(points: list[job_pb2.MetricPoint]) -> dict[int, float]:
    """step -> eval loss, latest attempt first (includes the final evaluation)."""
    curve: dict[int, tuple[int, float]] = {}
    for p in points:
        if p.HasField("eval_loss") and (p.step not in curve or p.attempt >= curve[p.step][0]):
            curve[p.step] = (p.attempt, p.eval_loss)
    return {step: loss for step, (_, loss) in sorted(curve.items())}


def max_abs_difference(curve: dict[int, float], reference: dict[int, float]) -> float:
    """Largest |a - b| over the steps of ``reference``; inf when a step is missing."""
    if set(curve) != set(reference):
        return float("inf")
    return max((abs(curve[s] - reference[s]) for s in reference), default=0.0)


# ---------------------------------------------------------------- report-channel proxy


class FlakyProxy:
    """A TCP proxy (asyncio, in its own thread) between trainers and the server.

    Start the proxy first, start the server with ``advertise_address`` set to
    :attr:`address`, then set :attr:`upstream` to the server's port.
    :meth:`refuse` closes the listening socket and aborts every open
    connection (clients get ECONNREFUSED); :meth:`drop` keeps listening but
    resets each connection as soon as it is accepted; :meth:`restore` forwards
    again on the same port.
    """

    def __init__(self) -> None:
        self.upstream: int | None = None
        self.mode = "forward"
        self.accepted = 0
        self.dropped = 0
        self.aborted = 0
        self.forwarded_bytes = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._dropped_event = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="flaky-proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self.port = 0
        self._call(self._listen())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode != "forward" or self.upstream is None:
            _reset(writer)
            with self._dropped_event:
                self.dropped += 1
                self._dropped_event.notify_all()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            _reset(writer)
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                self.forwarded_bytes += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    async def _abort_all(self) -> None:
        for writer in list(self._writers):
            self.aborted += 1
            _reset(writer)
        self._writers.clear()

    def refuse(self) -> None:
        async def go() -> None:
            self.mode = "refuse"
            assert self._server is not None
            self._server.close()
            await self._abort_all()

        self._call(go())

    def drop(self) -> None:
        async def go() -> None:
            was = self.mode
            self.mode = "drop"
            if was == "refuse":
                await self._listen()
            await self._abort_all()

        self._call(go())

    def wait_dropped(self, count: int, timeout: float = 60) -> None:
        """Wait until at least ``count`` connections were dropped in all."""
        with self._dropped_event:
            if not self._dropped_event.wait_for(lambda: self.dropped >= count, timeout):
                raise AssertionError(f"only {self.dropped} connection(s) dropped in {timeout:.0f}s")

    def restore(self) -> None:
        async def go() -> None:
            was = self.mode
            self.mode = "forward"
            if was == "refuse":
                await self._listen()

        self._call(go())

    def close(self) -> None:
        async def go() -> None:
            if self._server is not None:
                self._server.close()
            await self._abort_all()

        with contextlib.suppress(Exception):
            self._call(go())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), like a crashed peer."""
    transport = writer.transport
    with contextlib.suppress(OSError, RuntimeError, AttributeError):
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError, RuntimeError):
        transport.abort()
