"""The scheduler: fills each compute pool's free slots with waiting jobs in
queue order, provisions a worker for each from the pool's provider (in the
background, so a slow provider never blocks the others), starts the trainer,
and settles attempts when their worker ends (after ingesting any reports the
trainer wrote to its outbox but could not deliver). Each tick it also enforces
stall and maximum-duration deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from brightrun_server.domain.reports import Report
from brightrun_server.executors.local import LocalExecutor, is_alive
from brightrun_server.executors.providers import ComputeProvider, Outcome
from brightrun_server.services.jobs import ClaimedAttempt, JobService
from brightrun_server.store.models import AttemptRow

log = logging.getLogger(__name__)

OutboxReader = Callable[[str], list[Report]]
TICK_SECONDS = 1.0
#: Ticks between looks for the workers of dead replicas.
TAKEOVER_EVERY = 3
LOG_TAIL_LINES = 50


class Scheduler:
    """Implements the job service's AttemptControl."""

    def __init__(
        self,
        jobs: JobService,
        executor_factory: Callable[[Scheduler], LocalExecutor],
        read_outbox: OutboxReader,
        *,
        providers: Mapping[str, ComputeProvider],
        stall_seconds: float = 900.0,
        replica_timeout_seconds: float = 10.0,
        sole_replica: bool = False,
    ) -> None:
        self._jobs = jobs
        self.executor = executor_factory(self)
        self._read_outbox = read_outbox
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stall_seconds = stall_seconds
        self._replica_timeout = replica_timeout_seconds
        self._sole_replica = sole_replica
        self._ticks = 0
        #: Loop time at which the earliest waiting retry falls due (see _fill).
        self._next_due: float | None = None
        self.providers = dict(providers)
        #: Provisioning requests in flight per pool: they hold a slot.
        self._provisioning: dict[str, int] = dict.fromkeys(self.providers, 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._attempt_dirs: dict[str, Path] = {}
        self._attempt_pool: dict[str, str] = {}

    # AttemptControl ---------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def request_stop(self, attempt_id: str) -> None:
        self.executor.stop(attempt_id)

    # lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        await self._reconcile()
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        # Upkeep (replica heartbeat, take-over, deadlines) runs once a tick; a
        # wake (a job created, a worker gone) only runs the scheduling pass, so a
        # burst of CreateJob calls does not add two write transactions each.
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the
        # cancellation that stop() sends, and this loop would never end.
        loop = asyncio.get_running_loop()
        next_upkeep = loop.time()
        while not self._stopping:
            if loop.time() >= next_upkeep:
                next_upkeep = loop.time() + TICK_SECONDS
                await self._upkeep()
            try:
                await self._fill()
            except Exception:
                log.exception("scheduling pass failed; retrying")
            # Wake at the next tick, or as soon as a retry falls due.
            deadline = next_upkeep if self._next_due is None else min(next_upkeep, self._next_due)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._wake.wait()
            self._wake.clear()

    async def _upkeep(self) -> None:
        self._ticks += 1
        try:
            await self._jobs.heartbeat()
            if self._ticks % TAKEOVER_EVERY == 0:
                await self._take_over()
        except Exception:
            log.exception("replica upkeep failed; retrying")
        try:
            for attempt_id in await self._jobs.enforce_deadlines(self._stall_seconds):
                self.executor.stop(attempt_id)
        except Exception:
            log.exception("deadline check failed; retrying")

    # scheduling -------------------------------------------------------------

    def free_slots(self, pool: str) -> int:
        return self.providers[pool].slots - self.executor.running_in(pool) - self._provisioning[pool]

    async def _fill(self) -> None:
        self._next_due = None
        if all(self.free_slots(pool) <= 0 for pool in self.providers):
            return  # a slot freeing up wakes the loop
        backoffs = await self._jobs.backoffs()
        if backoffs.next_due is not None:
            loop = asyncio.get_running_loop()
            wait = (backoffs.next_due - datetime.now(UTC)).total_seconds()
            self._next_due = loop.time() + max(0.0, wait) + 0.005  # just past it: due means <= now
        reserved = backoffs.reserved  # a job in its recovery backoff keeps its slot
        for pool in self.providers:
            while self.free_slots(pool) - reserved.get(pool, 0) > 0:
                claim = await self._jobs.claim_next(pool)
                if claim is None:
                    break
                self._provisioning[pool] += 1
                task = asyncio.create_task(self._provision(pool, claim), name=f"provision-{claim.job_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _provision(self, pool: str, claim: ClaimedAttempt) -> None:
        """Ask the pool's provider for a worker, then start the trainer on it."""
        provider = self.providers[pool]
        spot = claim.pricing_tier == "spot"
        try:
            try:
                outcome = await provider.provision(claim.gpu_type, spot)
            except Exception:
                log.exception("provisioning %s failed unexpectedly", claim.job_id)
                outcome = Outcome.TIMEOUT
            if outcome is not Outcome.PROVISIONED:
                await self._jobs.provisioning_failed(claim, outcome.value)
                return
            self._attempt_dirs[claim.attempt_id] = claim.spec.attempt_dir
            self._attempt_pool[claim.attempt_id] = pool
            try:
                log_path = claim.spec.attempt_dir / "stdout.log"
                pid = await self.executor.launch(claim.attempt_id, claim.spec_path, log_path, pool=pool)
            except Exception as e:
                log.exception("could not start the trainer for %s", claim.job_id)
                self._attempt_dirs.pop(claim.attempt_id, None)
                self._attempt_pool.pop(claim.attempt_id, None)
                await self._jobs.launch_failed(claim, e)
                return
            provider.launched(claim.attempt_id, pid, spot)
            if await self._jobs.attempt_launched(claim.attempt_id, pid):
                self.executor.stop(claim.attempt_id)
        except Exception:
            log.exception("starting %s failed", claim.job_id)
        finally:
            self._provisioning[pool] -= 1
            self.wake()

    async def on_exit(self, attempt_id: str, exit_code: int | None, signal: int | None) -> None:
        pool = self._attempt_pool.pop(attempt_id, None)
        if pool is not None:
            self.providers[pool].ended(attempt_id)
        attempt_dir = self._attempt_dirs.pop(attempt_id, None)
        tail: list[str] = []
        try:
            if attempt_dir is not None:
                leftovers = await asyncio.to_thread(self._read_outbox, str(attempt_dir / "reports.jsonl"))
                if leftovers:
                    await self._jobs.ingest(attempt_id, leftovers, token=None)
                tail = await asyncio.to_thread(_tail, attempt_dir / "stdout.log", LOG_TAIL_LINES)
        except Exception:
            log.exception("ingesting the outbox of attempt %s failed; settling without it", attempt_id)
        try:
            await self._jobs.attempt_exited(attempt_id, exit_code=exit_code, signal=signal, log_tail=tail)
        except Exception as e:
            log.exception("settling attempt %s failed", attempt_id)
            await self._jobs.force_fail(attempt_id, f"settling the attempt failed: {type(e).__name__}: {e}")
        self.wake()

    async def _take_over(self) -> None:
        """Watch the workers of replicas that died: re-attach to live ones on this
        host, settle the rest as lost (recovery takes it from there)."""
        for attempt in await self._jobs.take_over(self._replica_timeout):
            await self._watch(attempt)

    async def _reconcile(self) -> None:
        """At start, before any job is claimed: attempts whose owner replica is
        gone (an earlier incarnation of this server included) are taken over.
        As the sole replica (it holds the store's lock) every other owner is gone,
        however recent its last heartbeat; otherwise an owner counts as gone once
        silent for the replica timeout (later ticks catch the rest). Either way the
        re-attached trainers hold their slots before the first claim."""
        while attempts := await self._jobs.take_over(self._replica_timeout, others_dead=self._sole_replica):
            for attempt in attempts:
                await self._watch(attempt)

    async def _watch(self, attempt: AttemptRow) -> None:
        if attempt.id in self._attempt_pool or self.executor.pid(attempt.id) is not None:
            return
        if attempt.pid is None:
            # Claimed but never launched (the owner died while provisioning).
            await self._jobs.attempt_exited(attempt.id, exit_code=None, signal=None)
            self.wake()
            return
        attempt_dir = self._jobs.job_dir(attempt.job_id) / "attempts" / str(attempt.number)
        self._attempt_dirs[attempt.id] = attempt_dir
        if is_alive(attempt.pid, marker=str(attempt_dir / "spec.json")):
            self._attempt_pool[attempt.id] = attempt.pool
            self.executor.adopt(attempt.id, attempt.pid, pool=attempt.pool)
        else:
            log.warning("attempt %s lost its worker while its replica was down", attempt.id)
            await self.on_exit(attempt.id, None, None)


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return text.splitlines()[-lines:]
