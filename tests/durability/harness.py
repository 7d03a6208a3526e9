"""Real server processes for the durability tests.

:class:`ServerProcess` runs ``python -m brightrun_server`` on a fixed port and
data dir, so it can be killed (SIGKILL), stopped (SIGTERM) and started again on
the same address and store while its trainers keep running and reporting to
that address. :func:`trainers` reads the live trainer processes from /proc and
:func:`attempt_rows` the attempts (numbers and pids) from the SQLite store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from brightrun.v1 import dataset_service_pb2_grpc, job_service_pb2_grpc
from tests.conftest import TEST_API_KEY, auth_channel
from tests.e2e.harness import Api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(address: str) -> Api:
    """The e2e harness's raw-stub API over an authenticated channel."""
    channel = auth_channel(address)
    return Api(
        channel,
        dataset_service_pb2_grpc.DatasetServiceStub(channel),
        job_service_pb2_grpc.JobServiceStub(channel),
    )


@dataclass
class ServerProcess:
    """``python -m brightrun_server`` as a child process; restartable on the same port and data dir."""

    data_dir: Path
    log_dir: Path
    settings: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"server-{self.starts}.log"

    def start(self, timeout: float = 90) -> ServerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        ready = self.log_dir / f"server-{self.starts}.port"
        env = dict(os.environ, BRIGHTRUN_BOOTSTRAP_API_KEY=TEST_API_KEY, BRIGHTRUN_LOG_LEVEL="INFO")
        env.update({f"BRIGHTRUN_{k.upper()}": v for k, v in self.settings.items()})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "brightrun_server", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), "--ready-file", str(ready)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not ready.exists() or not ready.read_text().strip():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def signal(self, sig: signal.Signals, timeout: float = 60) -> int:
        """Send `sig` and wait for the process to end; its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server ignored {sig.name} for {timeout:.0f}s:\n{self.log_tail()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def logs(self) -> str:
        """Every incarnation's log, oldest first."""
        return "\n".join(
            (self.log_dir / f"server-{n}.log").read_text(errors="replace") for n in range(1, self.starts + 1)
        )


def trainers(data_dir: Path) -> dict[int, str]:
    """Live (non-zombie) trainer processes of `data_dir`: pid -> "job_id/attempt"."""
    found: dict[int, str] = {}
    marker = str(data_dir / "jobs").encode() + b"/"
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
            if marker not in text or b"brightrun_trainer" not in text:
                continue
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("Z", "X"):
            continue
        spec = next(a for a in text.split(b"\0") if marker in a).decode()
        job_id, _, number = spec[len(marker) :].split("/")[:3]
        found[int(cmdline.parent.name)] = f"{job_id}/{number}"
    return found


def kill_trainers(data_dir: Path) -> None:
    """SIGKILL whatever trainers of `data_dir` are still running (test cleanup)."""
    for pid in trainers(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class AttemptRecord:
    job_id: str
    number: int
    pid: int | None
    state: str
    start_time: str


def attempt_rows(data_dir: Path) -> list[AttemptRecord]:
    """Every attempt in the SQLite store (read-only), in start order."""
    uri = f"file:{data_dir / 'brightrun.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        rows = conn.execute(
            "SELECT job_id, number, pid, state, start_time FROM job_attempts ORDER BY start_time, id"
        ).fetchall()
    return [AttemptRecord(*row) for row in rows]


class Sampler:
    """Calls `probe` every `interval` seconds in a thread and keeps the results."""

    def __init__(self, probe: Callable[[], dict[int, str]], interval: float = 0.2) -> None:
        import threading

        self.samples: list[dict[int, str]] = []
        self._probe = probe
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.samples.append(self._probe())

    def stop(self) -> list[dict[int, str]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples


def wait_attempts_ended(data_dir: Path, timeout: float = 60) -> list[AttemptRecord]:
    """Wait until no attempt is running (its process exited and was settled); all attempts."""
    deadline = time.monotonic() + timeout
    while True:
        rows = attempt_rows(data_dir)
        if all(a.state != "running" for a in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"attempts still running after {timeout:.0f}s: {rows}")
        time.sleep(0.1)
