"""Queue planning: when each waiting job is expected to start.

Per pool, every slot becomes free when the job holding it is expected to end
(from its estimate and progress) or now if it is free; waiting jobs take the
earliest free slot in queue order and start a provisioning buffer later (seeds:
5 minutes), then hold it for their own expected duration. Confidence follows the
seeds: "high" for the next job on a free slot, "medium" with 1-2 jobs ahead,
"low" beyond.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class Running:
    pool: str
    remaining: timedelta


@dataclass(frozen=True, slots=True)
class Waiting:
    job_id: str
    pool: str
    duration: timedelta


@dataclass(frozen=True, slots=True)
class Planned:
    job_id: str
    position: int
    start: datetime
    confidence: str


def plan(
    now: datetime,
    slots: Mapping[str, int],
    running: Sequence[Running],
    waiting: Sequence[Waiting],
    *,
    buffer: timedelta,
) -> list[Planned]:
    """Expected starts for `waiting`, given in queue order."""
    free: dict[str, list[datetime]] = {}
    for pool, count in slots.items():
        busy = sorted(now + r.remaining for r in running if r.pool == pool)[:count]
        free[pool] = busy + [now] * max(0, count - len(busy))
        heapq.heapify(free[pool])
    ahead: dict[str, int] = {}
    out: list[Planned] = []
    for position, job in enumerate(waiting, start=1):
        heap = free.setdefault(job.pool, [now])
        if not heap:
            heapq.heappush(heap, now)
        slot_free = heapq.heappop(heap)
        start = max(slot_free, now) + buffer
        n_ahead = ahead.get(job.pool, 0)
        confidence = "high" if n_ahead == 0 and slot_free <= now else ("medium" if n_ahead <= 2 else "low")
        out.append(Planned(job.job_id, position, start, confidence))
        heapq.heappush(heap, start + job.duration)
        ahead[job.pool] = n_ahead + 1
    return out


def delays(before: Sequence[Planned], after: Sequence[Planned]) -> dict[str, timedelta]:
    """How much later each job starts in `after` than in `before`, for the jobs
    whose place in the queue got worse (both plans made at the same `now`)."""
    earlier = {p.job_id: p for p in before}
    return {
        p.job_id: p.start - earlier[p.job_id].start
        for p in after
        if p.job_id in earlier and p.position > earlier[p.job_id].position and p.start > earlier[p.job_id].start
    }
