"""The local executor: each job attempt is its own trainer process on this host.

Trainers start in their own session (process group), so a signal aimed at the
server — Ctrl-C, a SIGTERM from a supervisor — never reaches them, and a server
restart can re-attach to trainers that outlived it by pid. Stopping a trainer
is SIGTERM to its group (it checkpoints and exits), then SIGKILL after a grace
period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ExitCallback = Callable[[str, int | None, int | None], Awaitable[None]]


@dataclass(slots=True)
class _Worker:
    attempt_id: str
    pid: int
    process: asyncio.subprocess.Process | None
    pool: str = "local"
    watcher: asyncio.Task[None] | None = None
    killer: asyncio.Task[None] | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class LocalExecutor:
    def __init__(
        self,
        *,
        python: str,
        stop_grace_seconds: float,
        on_exit: ExitCallback,
        env: Mapping[str, str] | None = None,
        memory_limit_bytes: int | None = None,
    ) -> None:
        self._python = python
        self._grace = stop_grace_seconds
        self._on_exit = on_exit
        self._env = dict(env) if env is not None else None
        self._workers: dict[str, _Worker] = {}
        self._memory_limit = memory_limit_bytes

    def running_in(self, pool: str) -> int:
        return sum(1 for w in self._workers.values() if w.pool == pool)

    def running(self) -> list[str]:
        return list(self._workers)

    def pid(self, attempt_id: str) -> int | None:
        worker = self._workers.get(attempt_id)
        return worker.pid if worker else None

    async def launch(self, attempt_id: str, spec_path: Path, log_path: Path, *, pool: str = "local") -> int:
        env = dict(os.environ if self._env is None else self._env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "ab") as out:  # noqa: ASYNC230 - opening a log file is instant
            process = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                "brightrun_trainer",
                "run",
                "--spec",
                str(spec_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=env,
                preexec_fn=self._limit_memory if self._memory_limit else None,
            )
        worker = _Worker(attempt_id, process.pid, process, pool)
        self._workers[attempt_id] = worker
        worker.watcher = asyncio.create_task(self._watch_child(worker), name=f"watch-{attempt_id}")
        log.info("started trainer pid %d for attempt %s", process.pid, attempt_id)
        return process.pid

    def _limit_memory(self) -> None:
        """Runs in the child before exec: cap its address space, so running out
        of it raises an allocation error the trainer reports as out of memory."""
        assert self._memory_limit is not None
        resource.setrlimit(resource.RLIMIT_AS, (self._memory_limit, self._memory_limit))

    def adopt(self, attempt_id: str, pid: int, *, pool: str = "local") -> None:
        """Watch a trainer started by an earlier server process."""
        worker = _Worker(attempt_id, pid, None, pool)
        self._workers[attempt_id] = worker
        worker.watcher = asyncio.create_task(self._watch_orphan(worker), name=f"adopt-{attempt_id}")
        log.info("re-attached to trainer pid %d for attempt %s", pid, attempt_id)

    async def _watch_child(self, worker: _Worker) -> None:
        assert worker.process is not None
        code = await worker.process.wait()
        await self._finish(worker, None if code < 0 else code, -code if code < 0 else None)

    async def _watch_orphan(self, worker: _Worker) -> None:
        # Not our child, so no wait(): a pidfd becomes readable when the process
        # exits. The exit status is unknowable; the attempt's reports decide.
        try:
            fd = os.pidfd_open(worker.pid)
        except ProcessLookupError:
            await self._finish(worker, None, None)
            return
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, exited.set)
        try:
            await exited.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        await self._finish(worker, None, None)

    async def _finish(self, worker: _Worker, code: int | None, sig: int | None) -> None:
        worker.exited.set()
        if worker.killer:
            worker.killer.cancel()
        log.info("trainer for attempt %s ended (code %s, signal %s)", worker.attempt_id, code, sig)
        try:
            await self._on_exit(worker.attempt_id, code, sig)
        except Exception:
            log.exception("handling the exit of attempt %s failed", worker.attempt_id)
        finally:
            # Registered until its exit is settled, so shutdown waits for that.
            self._workers.pop(worker.attempt_id, None)

    def stop(self, attempt_id: str) -> None:
        """SIGTERM now (the trainer checkpoints and exits), SIGKILL after the grace period."""
        worker = self._workers.get(attempt_id)
        if worker is None or worker.killer is not None or worker.exited.is_set():
            return
        _signal_group(worker.pid, signal.SIGTERM)
        worker.killer = asyncio.create_task(self._kill_later(worker), name=f"kill-{attempt_id}")

    async def _kill_later(self, worker: _Worker) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._grace):
                await worker.exited.wait()
            return
        log.warning("trainer pid %d ignored SIGTERM for %.0fs; killing it", worker.pid, self._grace)
        _signal_group(worker.pid, signal.SIGKILL)

    async def kill_all(self) -> None:
        """SIGKILL every trainer and wait for the exits to be handled (tests, shutdown --kill)."""
        workers = list(self._workers.values())
        for worker in workers:
            if not worker.exited.is_set():
                _signal_group(worker.pid, signal.SIGKILL)
        for worker in workers:
            if worker.watcher is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.watcher

    async def detach(self) -> None:
        """Stop watching (server shutdown); trainers keep running and reporting.
        Exits already being settled are allowed to finish first."""
        for worker in list(self._workers.values()):
            if worker.exited.is_set() and worker.watcher is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.watcher
                continue
            for task in (worker.watcher, worker.killer):
                if task is not None:
                    task.cancel()
        self._workers.clear()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def is_alive(pid: int, marker: str | None = None) -> bool:
    """True if `pid` runs and (when given) its command line contains `marker`."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]
        if state in ("Z", "X"):
            return False
        if marker is None:
            return True
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
