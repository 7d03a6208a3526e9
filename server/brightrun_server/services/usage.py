"""GPU hours and spend per project and calendar month (UTC), from attempts'
billed intervals (launch to end) and the rate each attempt ran at."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from brightrun_server.store.models import AttemptRow, JobRow


def month_start(now: datetime, offset: int = 0) -> datetime:
    """The first instant of the month `offset` months from `now`'s (UTC)."""
    year, month = now.year, now.month + offset
    while month > 12:
        year, month = year + 1, month - 12
    while month < 1:
        year, month = year - 1, month + 12
    return datetime(year, month, 1, tzinfo=UTC)


@dataclass(slots=True)
class Month:
    month: str
    gpu_hours: float = 0.0
    spend_usd: float = 0.0
    jobs: int = 0


async def _intervals(
    session: AsyncSession, project: str, since: datetime
) -> list[tuple[str, datetime, datetime | None, float]]:
    rows = await session.execute(
        sa.select(AttemptRow.job_id, AttemptRow.launch_time, AttemptRow.end_time, AttemptRow.hourly_rate_usd)
        .join(JobRow, JobRow.id == AttemptRow.job_id)
        .where(
            JobRow.project == project,
            AttemptRow.launch_time.is_not(None),
            sa.or_(AttemptRow.end_time.is_(None), AttemptRow.end_time >= since),
        )
    )
    return [(job_id, launch, end, rate) for job_id, launch, end, rate in rows.all() if launch is not None]


async def gpu_hours_this_month(session: AsyncSession, project: str, now: datetime) -> float:
    start = month_start(now)
    total = 0.0
    for _, launch, end, _ in await _intervals(session, project, start):
        total += max(0.0, ((end or now) - max(launch, start)).total_seconds())
    return total / 3600


async def by_month(session: AsyncSession, project: str, now: datetime, months: int) -> list[Month]:
    """GPU hours, spend and jobs per month, newest first, splitting intervals at month ends."""
    first = month_start(now, offset=-(months - 1))
    table = {
        month_start(now, -i).strftime("%Y-%m"): Month(month_start(now, -i).strftime("%Y-%m")) for i in range(months)
    }
    jobs: dict[str, set[str]] = defaultdict(set)
    for job_id, launch, end, rate in await _intervals(session, project, first):
        start, stop = max(launch, first), end or now
        while start < stop:
            boundary = month_start(start, offset=1)
            piece = min(stop, boundary)
            key = start.strftime("%Y-%m")
            if key in table:
                hours = (piece - start).total_seconds() / 3600
                table[key].gpu_hours += hours
                table[key].spend_usd += hours * rate
                jobs[key].add(job_id)
            start = piece
    for key, ids in jobs.items():
        table[key].jobs = len(ids)
    return [table[k] for k in sorted(table, reverse=True)]


def forecast_exhaustion(used: float, quota: float | None, now: datetime) -> datetime | None:
    """When usage reaches the quota at this month's pace; None if not before the reset."""
    if quota is None or used <= 0:
        return None
    start, reset = month_start(now), month_start(now, offset=1)
    elapsed = (now - start).total_seconds()
    if used >= quota:
        return now
    at = start + timedelta(seconds=elapsed * quota / used)
    return at if at < reset else None
