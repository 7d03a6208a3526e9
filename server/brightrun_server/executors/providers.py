"""Compute providers: where a job's worker comes from.

A provider answers a provisioning request with one of the outcomes the seeds
name. Two exist:

* ``local`` — this host's slots; always provisions at once.
* ``simulated-cloud`` — runs real trainer processes on this host, but behaves
  like a spot market described by a :class:`MarketConfig`: availability over
  time, a provisioning delay, failure rates per outcome, and an interruption
  hazard for spot workers that sends SIGTERM (the preemption notice) and then
  SIGKILL. It is how every provisioning and spot path is tested for real, and
  how a user rehearses a recovery policy before paying for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    PROVISIONED = "provisioned"
    SPOT_UNAVAILABLE = "spot_unavailable"
    TIMEOUT = "timeout"
    DATACENTER_UNAVAILABLE = "datacenter_unavailable"
    QUOTA_EXCEEDED = "quota_exceeded"
    RATE_LIMITED = "rate_limited"


class ComputeProvider(Protocol):
    name: str
    slots: int

    async def provision(self, gpu_type: str, spot: bool) -> Outcome: ...

    def availability(self, gpu_type: str) -> float | None: ...

    def launched(self, attempt_id: str, pid: int, spot: bool) -> None: ...

    def ended(self, attempt_id: str) -> None: ...


class LocalProvider:
    """This host: a slot is a worker."""

    def __init__(self, slots: int) -> None:
        self.name = "local"
        self.slots = slots

    async def provision(self, gpu_type: str, spot: bool) -> Outcome:
        return Outcome.PROVISIONED

    def availability(self, gpu_type: str) -> float | None:
        return None

    def launched(self, attempt_id: str, pid: int, spot: bool) -> None:
        return None

    def ended(self, attempt_id: str) -> None:
        return None


class MarketConfig(BaseModel):
    """A spot market to simulate. Times are seconds since the server started."""

    model_config = ConfigDict(extra="forbid")

    slots: int = Field(4, ge=1, le=256)
    #: Spot availability over time: (from second, availability 0..1) steps; the
    #: last step holds forever.
    availability: list[tuple[float, float]] = [(0.0, 0.8)]
    #: Provisioning takes a uniform time in this range.
    provisioning_delay_seconds: tuple[float, float] = (1.0, 3.0)
    #: Chance of each failure per request, before spot availability is consulted.
    failure_rates: dict[Outcome, float] = Field(
        default_factory=lambda: {
            Outcome.TIMEOUT: 0.02,
            Outcome.DATACENTER_UNAVAILABLE: 0.01,
            Outcome.QUOTA_EXCEEDED: 0.0,
            Outcome.RATE_LIMITED: 0.02,
        }
    )
    #: Mean spot interruptions per hour of running (a Poisson hazard).
    interruptions_per_hour: float = Field(0.5, ge=0)
    #: Seconds between the preemption notice (SIGTERM) and SIGKILL.
    notice_seconds: float = Field(30.0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> MarketConfig:
        if not self.availability or any(not 0 <= a <= 1 for _, a in self.availability):
            raise ValueError("availability steps must be (seconds, 0..1)")
        low, high = self.provisioning_delay_seconds
        if not 0 <= low <= high:
            raise ValueError("provisioning_delay_seconds must be (low, high) with 0 <= low <= high")
        if any(not 0 <= r <= 1 for r in self.failure_rates.values()) or sum(self.failure_rates.values()) > 1:
            raise ValueError("failure_rates must be probabilities summing to at most 1")
        return self


class SimulatedCloud:
    """A spot market on this host, driven by a MarketConfig."""

    def __init__(self, config: MarketConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = "simulated-cloud"
        self.slots = config.slots
        self.config = config
        self._clock = clock
        self._started = clock()
        self._rng = random.Random(config.seed)
        self._hazards: dict[str, asyncio.Task[None]] = {}

    def availability(self, gpu_type: str) -> float | None:
        elapsed = self._clock() - self._started
        current = self.config.availability[0][1]
        for since, value in self.config.availability:
            if elapsed >= since:
                current = value
        return current

    async def provision(self, gpu_type: str, spot: bool) -> Outcome:
        low, high = self.config.provisioning_delay_seconds
        await asyncio.sleep(self._rng.uniform(low, high))
        roll = self._rng.random()
        for outcome, rate in self.config.failure_rates.items():
            if roll < rate:
                return outcome
            roll -= rate
        if spot and self._rng.random() >= (self.availability(gpu_type) or 0.0):
            return Outcome.SPOT_UNAVAILABLE
        return Outcome.PROVISIONED

    def launched(self, attempt_id: str, pid: int, spot: bool) -> None:
        rate = self.config.interruptions_per_hour
        if not spot or rate <= 0:
            return
        after = self._rng.expovariate(rate / 3600)
        self._hazards[attempt_id] = asyncio.create_task(self._interrupt(attempt_id, pid, after), name=f"hazard-{pid}")

    def ended(self, attempt_id: str) -> None:
        task = self._hazards.pop(attempt_id, None)
        if task is not None:
            task.cancel()

    async def _interrupt(self, attempt_id: str, pid: int, after: float) -> None:
        await asyncio.sleep(after)
        log.info("simulated spot interruption of attempt %s (pid %d) after %.0fs", attempt_id, pid, after)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        await asyncio.sleep(self.config.notice_seconds)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    async def close(self) -> None:
        for task in self._hazards.values():
            task.cancel()
        self._hazards.clear()
