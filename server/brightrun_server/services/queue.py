"""The queue as users see it: order, expected starts, running jobs, statistics,
promotions with their audit trail, and project usage."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from brightrun_server.domain import caller, queueing
from brightrun_server.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument, PermissionDenied
from brightrun_server.domain.ids import new_id
from brightrun_server.domain.listing import decode_page_token, encode_page_token, page_size
from brightrun_server.domain.states import ACTIVE, JobState
from brightrun_server.services import usage
from brightrun_server.services.jobs import QUEUE_ORDER, Changes, JobService, SpotMarket, utcnow
from brightrun_server.store.db import Database
from brightrun_server.store.models import JobRow, QueueAuditRow

PROMOTION_REASONS = ("client_deadline", "critical_business_need", "urgent_fix", "manager_override")
WAITING_STATES = (JobState.QUEUED.value, JobState.RECOVERING.value)


@dataclass(slots=True)
class QueuedEntry:
    job: JobRow
    planned: queueing.Planned
    duration: timedelta


@dataclass(slots=True)
class ActiveEntry:
    job: JobRow
    progress: float
    remaining: timedelta


@dataclass(slots=True)
class Snapshot:
    time: datetime
    queued: list[QueuedEntry]
    active: list[ActiveEntry]
    pools: dict[str, tuple[int, int, float | None]]
    average_wait: timedelta
    longest_wait: timedelta
    throughput_per_day: float
    version: int = 0


@dataclass(slots=True)
class Promotion:
    job: JobRow
    delayed: dict[str, timedelta] = field(default_factory=dict)
    audit: QueueAuditRow | None = None


class QueueService:
    def __init__(
        self,
        db: Database,
        jobs: JobService,
        *,
        slots: Mapping[str, int],
        markets: Mapping[str, SpotMarket] | None = None,
        buffer: timedelta = timedelta(minutes=5),
        default_duration: timedelta = timedelta(hours=1),
    ) -> None:
        self._db = db
        self._jobs = jobs
        self.slots = dict(slots)
        self._markets = dict(markets or {})
        self._buffer = buffer
        self._default_duration = default_duration

    def duration(self, job: JobRow) -> timedelta:
        """A job's expected duration: the middle of its estimate, or the default."""
        estimate = (job.estimate or {}).get("duration")
        if estimate:
            low, high = estimate["hours"]
            return timedelta(hours=(low + high) / 2)
        return self._default_duration

    def remaining(self, job: JobRow) -> tuple[float, timedelta]:
        fraction = job.current_step / job.total_steps if job.total_steps else 0.0
        sps = (job.latest_metrics or {}).get("steps_per_second")
        if job.total_steps and isinstance(sps, int | float) and sps > 0:
            return fraction, timedelta(seconds=(job.total_steps - job.current_step) / sps)
        return fraction, self.duration(job) * (1 - fraction)

    async def snapshot(self) -> Snapshot:
        now = utcnow()
        project = caller.current().project
        async with self._db.read() as session:
            waiting = list(
                (
                    await session.scalars(
                        sa.select(JobRow)
                        .where(JobRow.project == project, JobRow.state.in_(WAITING_STATES))
                        .order_by(*QUEUE_ORDER)
                    )
                ).all()
            )
            running = list(
                (
                    await session.scalars(
                        sa.select(JobRow).where(JobRow.state.in_([s.value for s in ACTIVE])).order_by(JobRow.start_time)
                    )
                ).all()
            )
            week = now - timedelta(days=7)
            started = (
                await session.execute(
                    sa.select(JobRow.create_time, JobRow.start_time).where(
                        JobRow.project == project, JobRow.start_time >= week
                    )
                )
            ).all()
            finished = await session.scalar(
                sa.select(sa.func.count()).where(
                    JobRow.project == project, JobRow.state == JobState.COMPLETED.value, JobRow.end_time >= week
                )
            )
        active = [ActiveEntry(job, *self.remaining(job)) for job in running]
        planned = self._plan(now, active, waiting)
        queued = [QueuedEntry(job, p, self.duration(job)) for job, p in zip(waiting, planned, strict=True)]
        waits = [(start - created).total_seconds() for created, start in started if start is not None]
        pools = {
            name: (slots, sum(1 for a in active if a.job.pool == name), self._availability(name))
            for name, slots in self.slots.items()
        }
        return Snapshot(
            time=now,
            queued=queued,
            active=[a for a in active if a.job.project == project],
            pools=pools,
            average_wait=timedelta(seconds=sum(waits) / len(waits)) if waits else timedelta(0),
            longest_wait=max((now - j.create_time for j in waiting), default=timedelta(0)),
            throughput_per_day=int(finished or 0) / 7,
        )

    def _availability(self, pool: str) -> float | None:
        market = self._markets.get(pool)
        return market.availability("") if market is not None else None

    def _plan(self, now: datetime, active: list[ActiveEntry], waiting: list[JobRow]) -> list[queueing.Planned]:
        return queueing.plan(
            now,
            self.slots,
            [queueing.Running(a.job.pool, a.remaining) for a in active],
            [queueing.Waiting(j.id, j.pool, self.duration(j)) for j in waiting],
            buffer=self._buffer,
        )

    async def position(self, job: JobRow) -> queueing.Planned | None:
        if job.state not in WAITING_STATES:
            return None
        snap = await self.snapshot()
        return next((q.planned for q in snap.queued if q.job.id == job.id), None)

    async def promote(self, job_id: str, reason: str, justification: str) -> Promotion:
        who = caller.current()
        violations = []
        if reason not in PROMOTION_REASONS:
            allowed = ", ".join(r.upper() for r in PROMOTION_REASONS)
            violations.append(FieldViolation("reason", f"required; one of {allowed}"))
        if not 100 <= len(justification.strip()) <= 500:
            length = len(justification.strip())
            violations.append(FieldViolation("justification", f"must be 100 to 500 characters, got {length}"))
        if violations:
            raise InvalidArgument(violations)
        if who.role != caller.Role.ADMIN:
            raise PermissionDenied(
                "promoting a job needs the admin role", reason="PERMISSION_DENIED", metadata={"role": who.role.value}
            )
        before = await self.snapshot()
        if not any(q.job.id == job_id for q in before.queued):
            job = await self._jobs.get(job_id)
            raise FailedPrecondition(
                f"job {job_id} is {job.state}; only a waiting job can be promoted",
                reason="JOB_STATE_CONFLICT",
                metadata={"job_id": job_id, "state": job.state, "allowed_states": "queued"},
            )
        order = [q.job for q in before.queued]
        promoted = next(j for j in order if j.id == job_id)
        recovering = [j for j in order if j.state == JobState.RECOVERING.value]
        rest = [j for j in order if j.state != JobState.RECOVERING.value and j.id != job_id]
        # The same clock as the plan before: a second read would shift every
        # later start by the time in between and report jobs whose place did not
        # change as delayed.
        after_plan = self._plan(before.time, before.active, [*recovering, promoted, *rest])
        delayed = queueing.delays([q.planned for q in before.queued], after_plan)
        now = utcnow()
        changes = Changes()
        async with self._db.write() as session:
            job = await self._jobs.lock_job(session, job_id)
            job.promote_time = now
            audit = QueueAuditRow(
                id=new_id("aud"),
                project=job.project,
                job_id=job.id,
                action="promote",
                reason=reason,
                justification=justification.strip(),
                actor=who.actor,
                time=now,
                delayed=[{"job_id": k, "delay_seconds": v.total_seconds()} for k, v in delayed.items()],
            )
            session.add(audit)
            self._jobs.event(
                session,
                job,
                changes,
                "info",
                "PROMOTED",
                f"Promoted to the front by {who.actor} ({reason.replace('_', ' ')}); delays {len(delayed)} job(s)",
                {"reason": reason, "actor": who.actor, "delayed": len(delayed)},
            )
        self._jobs.publish(changes)
        if self._jobs.control:
            self._jobs.control.wake()
        return Promotion(job, delayed, audit)

    async def audit(self, *, size: int, token: str) -> tuple[list[QueueAuditRow], str]:
        limit = page_size(size, default=50, maximum=1000)
        project = caller.current().project
        scope = f"audit|{project}"
        key = decode_page_token(token, scope, ("time", "str"))
        query = sa.select(QueueAuditRow).where(QueueAuditRow.project == project)
        if key is not None:
            at = datetime.fromisoformat(key[0])
            query = query.where(
                sa.or_(QueueAuditRow.time < at, sa.and_(QueueAuditRow.time == at, QueueAuditRow.id < key[1]))
            )
        query = query.order_by(QueueAuditRow.time.desc(), QueueAuditRow.id.desc()).limit(limit + 1)
        async with self._db.read() as session:
            rows = list((await session.scalars(query)).all())
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = encode_page_token([rows[-1].time.isoformat(), rows[-1].id], scope)
        return rows, next_token

    async def usage(self, months: int) -> dict[str, Any]:
        if months < 0 or months > 36:
            raise InvalidArgument([FieldViolation("months", f"must be between 0 and 36, got {months}")])
        project = caller.current().project
        now = utcnow()
        async with self._db.read() as session:
            used = await usage.gpu_hours_this_month(session, project, now)
            history = await usage.by_month(session, project, now, months or 6)
        quota = self._jobs.quotas.get(project, self._jobs.default_quota_hours)
        return {
            "project": project,
            "used": used,
            "quota": quota,
            "remaining": None if quota is None else max(0.0, quota - used),
            "reset": usage.month_start(now, offset=1),
            "forecast": usage.forecast_exhaustion(used, quota, now),
            "months": history,
        }
