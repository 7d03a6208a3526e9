"""Jobs: creation, control, report ingestion, scheduling hand-off, completion.

Every change to a job happens in one write transaction that locks the job row,
applies domain decisions (state machine, config resolution, classification),
assigns stream sequence numbers, and records what changed; subscribers are told
only after the commit.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from brightrun_server.domain import caller, recovery
from brightrun_server.domain import config as cfg
from brightrun_server.domain.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from brightrun_server.domain.estimate import GpuSpec
from brightrun_server.domain.failures import FailureClass, Rulebook
from brightrun_server.domain.ids import new_id
from brightrun_server.domain.listing import (
    KeyKind,
    decode_page_token,
    encode_page_token,
    page_size,
    parse_filter,
)
from brightrun_server.domain.pricing import PricingTier, hourly_rate, known_gpu_types, resolve_gpu
from brightrun_server.domain.reports import (
    AttemptOutcome,
    CheckpointInput,
    EventInput,
    MetricValues,
    ProgressUpdate,
    Report,
    StageUpdate,
)
from brightrun_server.domain.requests import check_request_id
from brightrun_server.domain.states import (
    ACTIVE,
    STAGE_STATE,
    TERMINAL,
    WAITING,
    IllegalTransition,
    JobState,
    StageName,
    can_transition,
    transition,
)
from brightrun_server.services import estimation, usage
from brightrun_server.services.datasets import DatasetState
from brightrun_server.store.db import Database
from brightrun_server.store.models import (
    ArtifactRow,
    AttemptRow,
    CheckpointRow,
    DatasetRow,
    EventRow,
    FixOutcomeRow,
    JobRow,
    MetricRow,
    ReplicaRow,
)
from brightrun_server.store.query import after_key, compare
from brightrun_trainer.spec import AttemptSpec, ReportTarget, ReportTls, TrainingParams

log = logging.getLogger(__name__)
_SeqRow = TypeVar("_SeqRow", MetricRow, EventRow)

_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_\-]{0,62}$")
MAX_LABELS = 64
MAX_NOTE = 500
MIN_DURATION = timedelta(minutes=1)
MAX_DURATION = timedelta(days=7)
DEFAULT_DURATION = timedelta(hours=24)
CANCEL_REASONS = (
    "loss_not_decreasing",
    "cost_too_high",
    "wrong_configuration",
    "testing",
    "better_results_elsewhere",
    "client_request",
    "other",
)
STAGE_ORDER = list(StageName)


class Publisher(Protocol):
    """Told about committed changes; feeds live subscribers."""

    def job_changed(self, job: JobRow) -> None: ...
    def metrics_added(self, job_id: str, rows: Sequence[MetricRow]) -> None: ...
    def events_added(self, job_id: str, rows: Sequence[EventRow]) -> None: ...


class SpotMarket(Protocol):
    """The spot market of a compute pool."""

    def availability(self, gpu_type: str) -> float | None: ...


#: Spot availability below which creation warns.
LOW_SPOT_AVAILABILITY = 0.2


class AttemptControl(Protocol):
    """Reaches running workers and the scheduler."""

    def request_stop(self, attempt_id: str) -> None: ...
    def wake(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CreateJobInput:
    request_id: str
    name: str
    dataset_id: str
    base_model: str
    preset: cfg.PresetName | None
    overrides: Mapping[str, Any]
    gpu_type: str
    pricing_tier: PricingTier | None
    max_duration: timedelta | None
    labels: Mapping[str, str]
    acknowledge_oom_risk: bool = False
    #: RecoveryPolicy overrides by field name (recovery.resolve_policy keywords).
    recovery: Mapping[str, Any] = field(default_factory=dict)
    #: Set for retries and continuations.
    lineage: Lineage | None = None
    #: Create even if an unfinished job trains the same thing (double-start guard).
    force: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a derived job comes from."""

    root_job_id: str
    retry_of: str | None = None
    retry_number: int = 0
    resumed_from_job_id: str | None = None
    resumed_from_checkpoint_id: str | None = None
    resume_checkpoint_path: str | None = None
    lr_schedule_mode: str = "continue"
    applied_fixes: tuple[str, ...] = ()
    #: The failure the fixes address (recorded with their outcome).
    failure_class: str = ""


@dataclass(frozen=True, slots=True)
class EstimateInput:
    dataset_id: str
    base_model: str
    preset: cfg.PresetName | None
    overrides: Mapping[str, Any]
    gpu_type: str
    pricing_tier: PricingTier | None


@dataclass(frozen=True, slots=True)
class ClaimedAttempt:
    job_id: str
    attempt_id: str
    number: int
    spec: AttemptSpec
    spec_path: Path
    gpu_type: str = ""
    pricing_tier: str = "spot"


@dataclass(slots=True)
class Changes:
    jobs: dict[str, JobRow] = field(default_factory=dict)
    metrics: dict[str, list[MetricRow]] = field(default_factory=lambda: defaultdict(list))
    events: dict[str, list[EventRow]] = field(default_factory=lambda: defaultdict(list))
    stops: list[str] = field(default_factory=list)
    #: Jobs whose version was bumped in this transaction (once per transaction).
    touched: set[str] = field(default_factory=set)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class JobService:
    def __init__(
        self,
        db: Database,
        *,
        data_dir: Path,
        publisher: Publisher,
        rulebook: Rulebook,
        report_address: str,
        report_tls: ReportTls | None = None,
        trainer_threads: int | None = None,
        heartbeat_seconds: float = 5.0,
        debug_log_data: bool = False,
        recovery_defaults: recovery.RecoveryPolicy | None = None,
        default_pool: str = "local",
        quotas: Mapping[str, float] | None = None,
        default_quota_hours: float | None = None,
        provisioning_retry_seconds: float = 300.0,
        provisioning_max_attempts: int = 12,
    ) -> None:
        self._db = db
        self._data_dir = data_dir
        self._publisher = publisher
        self._rules = rulebook
        self._report_address = report_address
        self._report_tls = report_tls
        self._trainer_threads = trainer_threads
        self._heartbeat_seconds = heartbeat_seconds
        self._debug_log_data = debug_log_data
        self.recovery_defaults = recovery_defaults or recovery.RecoveryPolicy()
        self.default_pool = default_pool
        #: This server process among its replicas.
        self.replica_id = new_id("rep")
        self.provisioning_retry_seconds = provisioning_retry_seconds
        self.provisioning_max_attempts = provisioning_max_attempts
        #: The spot market of the default pool, where it has one (set by the app).
        self.market: SpotMarket | None = None
        self.quotas: dict[str, float] = dict(quotas or {})
        self.default_quota_hours = default_quota_hours
        self.control: AttemptControl | None = None

    def job_dir(self, job_id: str) -> Path:
        return self._data_dir / "jobs" / job_id

    # ------------------------------------------------------------------ create

    async def create(self, inp: CreateJobInput) -> JobRow:
        violations: list[FieldViolation] = []
        if problem := check_request_id(inp.request_id):
            violations.append(problem)
        if len(inp.description) > 2000:
            violations.append(
                FieldViolation("description", f"must be at most 2000 characters, got {len(inp.description)}")
            )
        if len(inp.name) > 256:
            violations.append(FieldViolation("name", f"must be at most 256 characters, got {len(inp.name)}"))
        if not inp.dataset_id:
            violations.append(FieldViolation("dataset_id", "required"))
        if not inp.base_model.strip():
            violations.append(FieldViolation("base_model", "required: a hub model name or a local directory"))
        elif len(inp.base_model) > 512:
            violations.append(FieldViolation("base_model", "must be at most 512 characters"))
        gpu = resolve_gpu(inp.gpu_type)
        if gpu is None:
            violations.append(
                FieldViolation(
                    "compute.gpu_type", f"must be one of {', '.join(known_gpu_types())}, got {inp.gpu_type!r}"
                )
            )
        duration = inp.max_duration if inp.max_duration is not None else DEFAULT_DURATION
        if not MIN_DURATION <= duration <= MAX_DURATION:
            violations.append(FieldViolation("compute.max_duration", "must be between 1 minute and 7 days"))
        if len(inp.labels) > MAX_LABELS:
            violations.append(FieldViolation("labels", f"must have at most {MAX_LABELS} entries"))
        for key, value in inp.labels.items():
            if not _LABEL_KEY.match(key):
                violations.append(FieldViolation(f"labels.{key}", "keys must match [a-z][a-z0-9_-]{0,62}"))
            elif len(value) > 63:
                violations.append(FieldViolation(f"labels.{key}", "values must be at most 63 characters"))
        try:
            resolved = cfg.resolve(inp.preset, inp.overrides)
        except InvalidArgument as e:
            violations.extend(e.violations)
            resolved = None
        try:
            policy = recovery.resolve_policy(self.recovery_defaults, **inp.recovery)
        except InvalidArgument as e:
            violations.extend(e.violations)
        if violations or resolved is None or gpu is None:
            raise InvalidArgument(violations)
        gpu_type = gpu.id

        tier = inp.pricing_tier or PricingTier.SPOT
        request_hash = self._request_hash(inp, resolved, gpu_type, tier, duration)

        changes = Changes()
        try:
            async with self._db.write() as session:
                if inp.request_id:  # a retry of a request that committed returns its job
                    found = await session.scalar(
                        sa.select(JobRow).where(
                            JobRow.project == caller.current().project, JobRow.request_id == inp.request_id
                        )
                    )
                    if found is not None:
                        self._check_same_request(found, request_hash)
                        return found
                dataset = await session.get(DatasetRow, inp.dataset_id)
                if dataset is None or dataset.delete_time is not None or dataset.project != caller.current().project:
                    raise NotFound("dataset", inp.dataset_id)
                if dataset.state != DatasetState.READY:
                    summary = dataset.validation
                    count = int(summary.get("critical_count", 0))
                    first = "; ".join(summary.get("first_errors", [])[:3])
                    raise FailedPrecondition(
                        f"dataset {dataset.id} has {count} critical validation error(s); fix them and upload "
                        f"again. First errors: {first}",
                        reason="DATASET_INVALID",
                        metadata={"dataset_id": dataset.id, "critical_count": str(count)},
                    )
                who = caller.current()
                fingerprint = cfg.fingerprint(dataset.sha256, inp.base_model.strip(), resolved.params)
                if not inp.force:
                    duplicate = await session.scalar(
                        sa.select(JobRow)
                        .where(
                            JobRow.project == who.project,
                            JobRow.fingerprint == fingerprint,
                            JobRow.state.not_in([s.value for s in TERMINAL]),
                        )
                        .limit(1)
                    )
                    if duplicate is not None and inp.request_id and duplicate.request_id == inp.request_id:
                        # A concurrent retry of this very request committed first.
                        self._check_same_request(duplicate, request_hash)
                        return duplicate
                    running = duplicate.id if duplicate is not None else None
                    if running is not None:
                        raise AlreadyExists(
                            f"job {running} already trains this dataset with this configuration and has not "
                            "finished; set force to start another",
                            reason="DUPLICATE_JOB",
                            metadata={"job_id": running, "config_fingerprint": fingerprint},
                        )
                await self._check_quota(session, who.project)
                warnings = self._capacity_warnings(gpu.id, tier)
                document = self._estimate_or_none(inp.base_model.strip(), resolved.params, gpu, tier, dataset)
                if document is not None and estimation.is_high_risk(document) and not inp.acknowledge_oom_risk:
                    top = (document.get("fixes") or [{}])[0]
                    raise FailedPrecondition(
                        estimation.describe_risk(document)
                        + ". Apply the fix, or set acknowledge_oom_risk to create the job anyway.",
                        reason="OOM_RISK_HIGH",
                        metadata={
                            "total_bytes": str(document["total_bytes"]),
                            "capacity_bytes": str(document["capacity_bytes"]),
                            "top_fix": str(top.get("kind", "")),
                        },
                    )
                now = utcnow()
                job_id = new_id("job")
                lineage = inp.lineage or Lineage(root_job_id=job_id)
                job = JobRow(
                    id=job_id,
                    name=inp.name or f"{Path(inp.base_model).name} on {dataset.name}"[:256],
                    dataset_id=dataset.id,
                    base_model=inp.base_model.strip(),
                    preset=resolved.preset.value,
                    custom=resolved.custom,
                    params=resolved.params.model_dump(mode="json"),
                    compute={
                        "gpu_type": gpu_type,
                        "pricing_tier": tier.value,
                        "max_duration_seconds": duration.total_seconds(),
                    },
                    labels=dict(inp.labels),
                    state=JobState.QUEUED.value,
                    state_message="Waiting for a free slot",
                    request_id=inp.request_id or None,
                    request_hash=request_hash,
                    fingerprint=fingerprint,
                    version=1,
                    create_time=now,
                    update_time=now,
                    start_time=None,
                    end_time=None,
                    current_step=0,
                    total_steps=0,
                    epoch=0.0,
                    total_epochs=resolved.params.epochs,
                    latest_metrics=None,
                    stages=[],
                    latest_checkpoint=None,
                    checkpoint_count=0,
                    cancel_reason=None,
                    cancel_note=None,
                    cancel_time=None,
                    failure=None,
                    output=None,
                    attempt_count=0,
                    last_metric_seq=0,
                    last_event_seq=0,
                    hourly_rate_usd=hourly_rate(gpu, tier),
                    billed_seconds=0.0,
                    billing_since=None,
                    estimate=document,
                    recovery_policy=policy.to_dict(),
                    consecutive_failures=0,
                    recovered_count=0,
                    next_attempt_time=None,
                    recovering_class=None,
                    interruptions=[],
                    decision=None,
                    paused_seconds=0.0,
                    paused_since=None,
                    progress_time=None,
                    retry_of=lineage.retry_of,
                    retry_number=lineage.retry_number,
                    root_job_id=lineage.root_job_id,
                    resumed_from_job_id=lineage.resumed_from_job_id,
                    resumed_from_checkpoint_id=lineage.resumed_from_checkpoint_id,
                    resume_checkpoint_path=lineage.resume_checkpoint_path,
                    lr_schedule_mode=lineage.lr_schedule_mode,
                    applied_fixes=list(lineage.applied_fixes),
                    description=inp.description,
                    created_by=who.actor,
                    project=who.project,
                    pool=self.pool_for(tier),
                    promote_time=None,
                    provisioning=None,
                    warnings=warnings,
                    cost_alert="",
                    overhead_seconds=0.0,
                )
                session.add(job)
                await session.flush()  # the job row before its events (no ORM relationships order them)
                for fix_id in lineage.applied_fixes:
                    session.add(
                        FixOutcomeRow(
                            failure_class=lineage.failure_class,
                            fix_id=fix_id,
                            source_job_id=lineage.retry_of or "",
                            retry_job_id=job.id,
                            create_time=now,
                        )
                    )
                changes.jobs[job.id] = job
                for warning in warnings:
                    self.event(session, job, changes, "warning", "CAPACITY_WARNING", warning)
                self.event(
                    session,
                    job,
                    changes,
                    "status",
                    "JOB_CREATED",
                    f"Job created from preset {resolved.preset.value}{' (custom)' if resolved.custom else ''}; queued",
                    {
                        "preset": resolved.preset.value,
                        "custom": resolved.custom,
                        "dataset_id": dataset.id,
                    },
                )
        except IntegrityError:
            if not inp.request_id:
                raise
            # A concurrent request with the same request_id won the insert.
            winner = await self._by_request_id(inp.request_id, request_hash)
            if winner is None:
                raise
            return winner
        self.publish(changes)
        if self.control:
            self.control.wake()
        return job

    def pool_for(self, tier: PricingTier) -> str:
        """The compute pool a job runs in."""
        return self.default_pool

    def _capacity_warnings(self, gpu_type: str, tier: PricingTier) -> list[str]:
        availability = self.spot_availability(gpu_type) if tier is PricingTier.SPOT else None
        if availability is not None and availability < LOW_SPOT_AVAILABILITY:
            return [
                f"spot availability for {gpu_type} is {availability:.0%} (below {LOW_SPOT_AVAILABILITY:.0%}); "
                "provisioning may be slow and interruptions frequent — consider on-demand"
            ]
        return []

    def spot_availability(self, gpu_type: str) -> float | None:
        """Current spot availability of the default pool, where it has a market."""
        return self.market.availability(gpu_type) if self.market is not None else None

    async def _check_quota(self, session: AsyncSession, project: str) -> None:
        quota = self.quotas.get(project, self.default_quota_hours)
        if quota is None:
            return
        used = await usage.gpu_hours_this_month(session, project, utcnow())
        if used >= quota:
            reset = usage.month_start(utcnow(), offset=1)
            raise ResourceExhausted(
                f"project {project} used {used:.1f} of its {quota:g} GPU hours this month; "
                f"the quota resets on {reset:%Y-%m-%d}",
                reason="QUOTA_EXCEEDED",
                metadata={"used_hours": f"{used:.3f}", "quota_hours": f"{quota:g}", "reset_time": reset.isoformat()},
                retry_after=(reset - utcnow()).total_seconds(),
            )

    @staticmethod
    def _estimate_or_none(
        base_model: str, params: TrainingParams, gpu: GpuSpec, tier: PricingTier, dataset: DatasetRow
    ) -> dict[str, Any] | None:
        """The creation-time estimate, or None when the architecture is unknown
        (a hub model outside the catalog still trains; it just is not estimated)."""
        try:
            return estimation.run(base_model, params, gpu, tier, dataset)
        except InvalidArgument:
            return None

    async def estimate(self, inp: EstimateInput) -> dict[str, Any]:
        """Estimate without side effects; errors name the offending fields."""
        violations: list[FieldViolation] = []
        if not inp.base_model.strip():
            violations.append(FieldViolation("base_model", "required: a catalog model name or a local directory"))
        gpu = resolve_gpu(inp.gpu_type)
        if gpu is None:
            allowed = ", ".join(known_gpu_types())
            violations.append(FieldViolation("compute.gpu_type", f"must be one of {allowed}, got {inp.gpu_type!r}"))
        try:
            resolved = cfg.resolve(inp.preset, inp.overrides)
        except InvalidArgument as e:
            violations.extend(e.violations)
            resolved = None
        if violations or resolved is None or gpu is None:
            raise InvalidArgument(violations)
        dataset = None
        if inp.dataset_id:
            async with self._db.read() as session:
                dataset = await session.get(DatasetRow, inp.dataset_id)
            if dataset is None or dataset.delete_time is not None or dataset.project != caller.current().project:
                raise NotFound("dataset", inp.dataset_id)
        return estimation.run(
            inp.base_model.strip(), resolved.params, gpu, inp.pricing_tier or PricingTier.SPOT, dataset
        )

    def _request_hash(
        self,
        inp: CreateJobInput,
        resolved: cfg.ResolvedConfig,
        gpu: str,
        tier: PricingTier,
        duration: timedelta,
    ) -> str:
        body = {
            "name": inp.name,
            "dataset_id": inp.dataset_id,
            "base_model": inp.base_model.strip(),
            "preset": resolved.preset.value,
            "params": resolved.params.model_dump(mode="json"),
            "compute": [gpu, tier.value, duration.total_seconds()],
            "labels": dict(sorted(inp.labels.items())),
            "recovery": dict(sorted(inp.recovery.items())),
            "lineage": repr(inp.lineage),
            "description": inp.description,
            "force": inp.force,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    async def _by_request_id(self, request_id: str, request_hash: str) -> JobRow | None:
        async with self._db.read() as session:
            found = await session.scalar(
                sa.select(JobRow).where(JobRow.project == caller.current().project, JobRow.request_id == request_id)
            )
        if found is not None:
            self._check_same_request(found, request_hash)
        return found

    @staticmethod
    def _check_same_request(job: JobRow, request_hash: str) -> None:
        if job.request_hash != request_hash:
            raise InvalidArgument(
                [FieldViolation("request_id", f"was already used for job {job.id} with different parameters")],
                reason="REQUEST_ID_REUSED",
                metadata={"request_id": job.request_id or "", "job_id": job.id},
            )

    # ------------------------------------------------------------------ read

    async def get(self, job_id: str) -> JobRow:
        async with self._db.read() as session:
            job = await session.get(JobRow, job_id)
        if job is None or not _visible(job):
            raise NotFound("job", job_id)
        return job

    async def chain_spend(self, job: JobRow) -> float:
        """Spend across the job's retry and continuation chain, in USD."""
        now = utcnow()
        async with self._db.read() as session:
            rows = (await session.scalars(sa.select(JobRow).where(JobRow.root_job_id == job.root_job_id))).all()
        return sum(spend_usd(r, now) for r in rows) if rows else spend_usd(job, now)

    def _job_query(self, filter_text: str, query_text: str, order_by: str) -> tuple[Any, Any, bool, str]:
        """The caller's project's jobs matching a filter and a search, and the
        sort column and direction."""
        comparisons = parse_filter(filter_text, _JOB_FILTERS, prefix_fields={"labels": str})
        sort_name, descending = _parse_order(order_by)
        query = sa.select(JobRow).where(JobRow.project == caller.current().project)
        for c in comparisons:
            if c.field.startswith("labels."):
                column: Any = JobRow.labels[c.field.split(".", 1)[1]].as_string()
            else:
                column = _JOB_COLUMNS[c.field]
            query = query.where(compare(column, c))
        if len(query_text) > MAX_SEARCH_CHARS:
            raise InvalidArgument(
                [FieldViolation("query", f"must be at most {MAX_SEARCH_CHARS} characters, got {len(query_text)}")]
            )
        if query_text:
            # The text is matched literally: % and _ are not wildcards.
            literal = query_text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern = f"%{literal}%"
            query = query.where(
                sa.or_(
                    sa.func.lower(JobRow.name).like(pattern, escape="\\"),
                    sa.func.lower(JobRow.description).like(pattern, escape="\\"),
                    sa.func.lower(sa.cast(JobRow.labels, sa.Text)).like(pattern, escape="\\"),
                )
            )
        return query, _SORTS[sort_name][0], descending, sort_name

    async def list_jobs(
        self, *, size: int, token: str, filter_text: str, query_text: str = "", order_by: str = ""
    ) -> tuple[list[JobRow], str]:
        limit = page_size(size, default=50, maximum=1000)
        query, sort, descending, sort_name = self._job_query(filter_text, query_text, order_by)
        scope = f"jobs|{caller.current().project}|{filter_text}|{query_text}|{sort_name}|{descending}"
        key = decode_page_token(token, scope, (_TOKEN_KINDS[_SORTS[sort_name][1]], "time", "str"))
        if key is not None:
            sort_value = _decode_sort_value(sort_name, key[0])
            query = query.where(
                after_key(
                    [sort, JobRow.create_time, JobRow.id],
                    [sort_value, datetime.fromisoformat(key[1]), key[2]],
                    descending=descending,
                )
            )
        columns = [sort, JobRow.create_time, JobRow.id]
        query = query.order_by(*[c.desc() if descending else c.asc() for c in columns]).limit(limit + 1)
        async with self._db.read() as session:
            rows = list((await session.scalars(query)).all())
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            value = _sort_value(sort_name, last)
            next_token = encode_page_token([value, last.create_time.isoformat(), last.id], scope)
        return rows, next_token

    async def export_jobs(self, *, filter_text: str, query_text: str, order_by: str) -> AsyncIterator[bytes]:
        """The matching jobs as CSV, a page at a time."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(EXPORT_COLUMNS)
        token = ""
        while True:
            rows, token = await self.list_jobs(
                size=1000, token=token, filter_text=filter_text, query_text=query_text, order_by=order_by
            )
            now = utcnow()
            for row in rows:
                writer.writerow(_export_row(row, now))
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
            if not token:
                return

    async def bulk_cancel(
        self, *, job_ids: Sequence[str], filter_text: str, reason: str, note: str
    ) -> list[tuple[str, JobRow | None, str]]:
        """Cancel each job; one (job id, job or None, error) per job. A filter that
        matches no job cancels nothing (an empty result, not an error)."""
        if not job_ids and not filter_text:
            raise InvalidArgument([FieldViolation("job_ids", "name jobs or a filter")])
        chosen = dict.fromkeys(job_ids)  # ordered and de-duplicated
        if filter_text:
            token = ""
            while True:
                rows, token = await self.list_jobs(size=1000, token=token, filter_text=filter_text)
                chosen.update(dict.fromkeys(r.id for r in rows))
                if not token:
                    break
        targets = list(chosen)
        results: list[tuple[str, JobRow | None, str]] = []
        for job_id in targets:
            try:
                results.append((job_id, await self.cancel(job_id, reason, note), ""))
            except InvalidArgument:
                raise
            except DomainError as e:
                results.append((job_id, None, e.message))
        return results

    async def switch_to_on_demand(self, job_id: str) -> JobRow:
        changes = Changes()
        async with self._db.write() as session:
            job = await self.lock_job(session, job_id)
            if JobState(job.state) in TERMINAL:
                raise FailedPrecondition(
                    f"job {job_id} is {job.state}",
                    reason="JOB_STATE_CONFLICT",
                    metadata={"job_id": job_id, "state": job.state},
                )
            self.switch_pricing(session, job, changes, PricingTier.ON_DEMAND)
        self.publish(changes)
        if self.control:
            self.control.wake()
        return job

    async def metrics_after(self, job_id: str, after_seq: int, limit: int) -> list[MetricRow]:
        async with self._db.read() as session:
            rows = await session.scalars(
                sa.select(MetricRow)
                .where(MetricRow.job_id == job_id, MetricRow.seq > after_seq)
                .order_by(MetricRow.seq)
                .limit(limit)
            )
            return list(rows.all())

    async def events_after(
        self, job_id: str, after_seq: int, limit: int, *, types: Sequence[str] = (), query: str = ""
    ) -> list[EventRow]:
        stmt = sa.select(EventRow).where(EventRow.job_id == job_id, EventRow.seq > after_seq)
        if types:
            stmt = stmt.where(EventRow.type.in_(types))
        if query:
            pattern = f"%{query.lower()}%"
            stmt = stmt.where(
                sa.or_(
                    sa.func.lower(EventRow.message).like(pattern),
                    sa.func.lower(EventRow.code).like(pattern),
                )
            )
        async with self._db.read() as session:
            rows = await session.scalars(stmt.order_by(EventRow.seq).limit(limit))
            return list(rows.all())

    async def list_metrics(self, job_id: str, *, size: int, token: str) -> tuple[list[MetricRow], str]:
        await self.get(job_id)
        limit = page_size(size, default=1000, maximum=10000)
        key = decode_page_token(token, f"metrics|{job_id}", ("int",))
        rows = await self.metrics_after(job_id, int(key[0]) if key else 0, limit + 1)
        return self._seq_page(rows, limit, f"metrics|{job_id}")

    async def list_events(
        self, job_id: str, *, size: int, token: str, types: Sequence[str], query: str
    ) -> tuple[list[EventRow], str]:
        await self.get(job_id)
        limit = page_size(size, default=100, maximum=1000)
        scope = f"events|{job_id}|{','.join(sorted(types))}|{query}"
        key = decode_page_token(token, scope, ("int",))
        rows = await self.events_after(job_id, int(key[0]) if key else 0, limit + 1, types=types, query=query)
        return self._seq_page(rows, limit, scope)

    @staticmethod
    def _seq_page(rows: list[_SeqRow], limit: int, scope: str) -> tuple[list[_SeqRow], str]:
        if len(rows) <= limit:
            return rows, ""
        rows = rows[:limit]
        return rows, encode_page_token([rows[-1].seq], scope)

    # ------------------------------------------------------------------ cancel

    async def cancel(self, job_id: str, reason: str, note: str) -> JobRow:
        violations = []
        if reason not in CANCEL_REASONS:
            violations.append(
                FieldViolation("reason", f"required; one of {', '.join(r.upper() for r in CANCEL_REASONS)}")
            )
        if len(note) > MAX_NOTE:
            violations.append(FieldViolation("note", f"must be at most {MAX_NOTE} characters, got {len(note)}"))
        if violations:
            raise InvalidArgument(violations)
        changes = Changes()
        async with self._db.write() as session:
            job = await self.lock_job(session, job_id)
            state = JobState(job.state)
            if state in (JobState.CANCELLING, JobState.CANCELLED):
                return job
            if state in TERMINAL:
                self.set_state(session, job, JobState.CANCELLED, changes, "")  # raises: terminal states are final
            now = utcnow()
            job.cancel_reason, job.cancel_note, job.cancel_time = reason, note, now
            waiting_for_capacity = state is JobState.PROVISIONING and job.next_attempt_time is not None
            if state in WAITING or waiting_for_capacity:
                if state is JobState.PAUSED and job.paused_since is not None:
                    job.paused_seconds += (now - job.paused_since).total_seconds()
                    job.paused_since = None
                job.decision, job.next_attempt_time = None, None
                message = (
                    "Cancelled before it started" if state is JobState.QUEUED else f"Cancelled while {state.value}"
                )
                self.set_state(session, job, JobState.CANCELLED, changes, message)
                job.end_time = now
                job.failure = None
            else:
                self.set_state(session, job, JobState.CANCELLING, changes, "Stopping the worker")
                attempt = await self.current_attempt(session, job)
                if attempt is not None and attempt.state == "running":
                    attempt.stop_requested = True
                    attempt.stop_reason = "cancel"
                    changes.stops.append(attempt.id)
            self.event(
                session,
                job,
                changes,
                "info",
                "CANCEL_REQUESTED",
                f"Cancel requested: {reason.replace('_', ' ')}" + (f" ({note})" if note else ""),
                {"reason": reason, "note": note},
            )
        self.publish(changes)
        return job

    # ------------------------------------------------------------------ scheduling

    async def backoffs(self) -> Backoffs:
        """Jobs waiting out a retry delay: recovering ones per pool whose lost
        worker was this replica's (each replica holds back only the slots its own
        workers held), and the earliest time any retry falls due."""
        now = utcnow()
        async with self._db.read() as session:
            rows = await session.execute(
                sa.select(JobRow.pool, sa.func.count())
                .join(AttemptRow, sa.and_(AttemptRow.job_id == JobRow.id, AttemptRow.number == JobRow.attempt_count))
                .where(
                    JobRow.state == JobState.RECOVERING.value,
                    JobRow.next_attempt_time > now,
                    AttemptRow.owner == self.replica_id,
                )
                .group_by(JobRow.pool)
            )
            reserved = {str(pool): int(count) for pool, count in rows.all()}
            next_due = await session.scalar(
                sa.select(sa.func.min(JobRow.next_attempt_time)).where(
                    JobRow.state.in_(_RETRYING), JobRow.next_attempt_time > now
                )
            )
        return Backoffs(reserved, next_due)

    async def claim_next(self, pool: str = "local") -> ClaimedAttempt | None:
        """Take the next waiting job of `pool` (queue order) and open an attempt
        for it; the scheduler then provisions a worker."""
        changes = Changes()
        async with self._db.write() as session:
            now = utcnow()
            # A recovering job goes first (it held a slot); it may start only when
            # its backoff has passed and its previous worker has exited, so two
            # trainers never share a checkpoint directory.
            query = (
                sa.select(JobRow)
                .where(claimable(now, sqlite=self._db.is_sqlite), JobRow.pool == pool)
                .order_by(*QUEUE_ORDER)
                .limit(1)
            )
            if not self._db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            job = await session.scalar(query)
            if job is None:
                return None
            dataset = await session.get(DatasetRow, job.dataset_id)
            assert dataset is not None
            number = job.attempt_count + 1
            token = secrets.token_urlsafe(32)
            attempt = AttemptRow(
                id=new_id("att"),
                job_id=job.id,
                number=number,
                state="running",
                token_hash=_hash_token(token),
                pid=None,
                start_time=now,
                end_time=None,
                heartbeat_time=None,
                exit_code=None,
                signal=None,
                last_report_seq=0,
                stop_requested=False,
                stop_reason=None,
                result=None,
                stages=[],
            )
            attempt.pool = pool
            attempt.owner = self.replica_id
            session.add(attempt)
            job.attempt_count = number
            job.start_time = job.start_time or now
            job.stages = [
                {
                    "stage": s.value,
                    "status": "pending",
                    "attempt": number,
                    "message": "",
                    "progress": 0.0,
                }
                for s in STAGE_ORDER
            ]
            self.stage(job, StageName.PROVISIONING, "running", "Starting the trainer process", 0.0, now)
            job.next_attempt_time = None
            resuming = "" if number == 1 else " (resuming from the newest verified checkpoint)"
            message = f"Provisioning a worker for attempt {number}{resuming}"
            if JobState(job.state) is JobState.PROVISIONING:
                job.state_message = message  # a provisioning retry: same state, new try
                self.touch(job, changes)
            else:
                self.set_state(session, job, JobState.PROVISIONING, changes, message)
            spec = AttemptSpec(
                job_id=job.id,
                attempt_id=attempt.id,
                attempt_number=number,
                job_dir=self.job_dir(job.id),
                dataset_path=Path(dataset.path),
                dataset_format=dataset.format,
                base_model=job.base_model,
                params=TrainingParams.model_validate(job.params),
                resume=True,
                resume_from=Path(job.resume_checkpoint_path) if job.resume_checkpoint_path and number == 1 else None,
                lr_schedule_mode=job.lr_schedule_mode,
                report=ReportTarget(address=self._report_address, token=token, tls=self._report_tls),
                threads=self._trainer_threads,
                heartbeat_seconds=self._heartbeat_seconds,
                debug_log_data=self._debug_log_data,
            )
            spec.attempt_dir.mkdir(parents=True, exist_ok=True)
            spec_path = spec.attempt_dir / "spec.json"
            _write_private(spec_path, spec.model_dump_json(indent=2))
        self.publish(changes)
        return ClaimedAttempt(
            job.id, attempt.id, number, spec, spec_path, job.compute["gpu_type"], job.compute["pricing_tier"]
        )

    async def provisioning_failed(self, claim: ClaimedAttempt, outcome: str) -> None:
        """The provider had no worker: nothing started, nothing billed. Try again
        after provisioning_retry_seconds, or wait for a decision after the last try."""
        changes = Changes()
        async with self._db.write() as session:
            job = await self.lock_job(session, claim.job_id)
            attempt = await session.get(AttemptRow, claim.attempt_id, with_for_update=True)
            if attempt is not None:
                await session.delete(attempt)
                job.attempt_count = claim.number - 1
            now = utcnow()
            previous = job.provisioning or {}
            tries = int(previous.get("attempt", 0)) + 1
            limit = int(previous.get("max_attempts") or self.provisioning_max_attempts)
            reason = outcome.replace("_", " ")
            job.stages = [
                {**st, "message": f"Provisioning failed ({reason}); try {tries} of {limit}"}
                if st["stage"] == StageName.PROVISIONING.value
                else st
                for st in job.stages
            ]
            state = JobState(job.state)
            if state is JobState.CANCELLING:
                self.finish_cancel(session, job, changes, now)
            elif tries >= limit:
                job.provisioning = {"attempt": tries, "max_attempts": limit, "last_outcome": outcome}
                job.next_attempt_time = None
                choices = [recovery.Choice.EXTEND]
                if job.compute["pricing_tier"] == PricingTier.SPOT.value:
                    choices.append(recovery.Choice.SWITCH_TO_ON_DEMAND)
                choices.append(recovery.Choice.CANCEL)
                message = f"No worker after {tries} provisioning attempts (last: {reason})"
                job.decision = {
                    "kind": "provisioning", "reason": message, "choices": [c.value for c in choices],
                    "since": now.isoformat(),
                }  # fmt: skip
                self.set_state(session, job, JobState.AWAITING_DECISION, changes, message)
                self.event(
                    session, job, changes, "warning", "PROVISIONING_ESCALATED", message,
                    {"outcome": outcome, "attempts": tries, "choices": [c.value for c in choices]},
                )  # fmt: skip
            else:
                at = now + timedelta(seconds=self.provisioning_retry_seconds)
                job.next_attempt_time = at
                job.provisioning = {
                    "attempt": tries, "max_attempts": limit, "last_outcome": outcome,
                    "next_attempt_time": at.isoformat(),
                }  # fmt: skip
                job.state_message = f"Provisioning failed ({reason}); retry {tries} of {limit} at {at:%H:%M:%S}"
                self.event(
                    session, job, changes, "warning", "PROVISIONING_FAILED", job.state_message,
                    {"outcome": outcome, "attempt": tries, "max_attempts": limit, "next_attempt_time": at.isoformat()},
                )  # fmt: skip
        shutil.rmtree(claim.spec.attempt_dir, ignore_errors=True)
        self.publish(changes)

    async def attempt_launched(self, attempt_id: str, pid: int) -> bool:
        """Record the worker's pid and start billing (a worker costs from its
        launch, not while it is being provisioned). True if the attempt should
        be stopped already."""
        changes = Changes()
        async with self._db.write() as session:
            locked = await self.lock_attempt(session, attempt_id)
            if locked is None:
                return True
            attempt, job = locked
            now = utcnow()
            attempt.pid = pid
            attempt.launch_time = now
            attempt.hourly_rate_usd = job.hourly_rate_usd
            tries = int((job.provisioning or {}).get("attempt", 0)) + 1
            job.provisioning = {
                "attempt": tries,
                "max_attempts": self.provisioning_max_attempts,
                "last_outcome": "provisioned",
            }
            if attempt.number == job.attempt_count and attempt.end_time is None:
                job.billing_since = now
                self.touch(job, changes)
            stop = attempt.stop_requested
        self.publish(changes)
        return stop

    async def launch_failed(self, claim: ClaimedAttempt, error: BaseException) -> None:
        changes = Changes()
        async with self._db.write() as session:
            job = await self.lock_job(session, claim.job_id)
            attempt = await session.get(AttemptRow, claim.attempt_id, with_for_update=True)
            assert attempt is not None
            now = utcnow()
            attempt.state, attempt.end_time = "failed", now
            self.close_billing(job, now)
            if JobState(job.state) is JobState.CANCELLING:
                self.finish_cancel(session, job, changes, now)
            else:
                failure = self.failure_doc(
                    FailureClass.PROVISIONING,
                    f"could not start the trainer: {error}",
                    stage=StageName.PROVISIONING,
                    step=last_step(job),
                    exception_type=type(error).__name__,
                )
                self.fail(session, job, changes, failure, now)
        self.publish(changes)

    # ------------------------------------------------------------------ reports

    async def ingest(self, attempt_id: str, reports: Sequence[Report], *, token: str | None) -> tuple[int, bool]:
        """Store reports exactly once, in order. Returns (acknowledged sequence,
        stop requested). `token` None means a trusted local source (the outbox)."""
        changes = Changes()
        async with self._db.write() as session:
            locked = await self.lock_attempt(session, attempt_id)
            if locked is None or (
                token is not None
                and (locked[0].state != "running" or not hmac.compare_digest(locked[0].token_hash, _hash_token(token)))
            ):
                raise Unauthenticated(
                    "attempt token is missing, unknown or expired",
                    reason="ATTEMPT_TOKEN_INVALID",
                    metadata={"attempt_id": attempt_id},
                )
            attempt, job = locked
            acked = attempt.last_report_seq
            for report in reports:
                if report.sequence <= acked:
                    continue
                if report.sequence != acked + 1:
                    break  # a gap: the trainer resends from acked + 1
                if report.body is not None:
                    try:
                        await self._apply(session, job, attempt, report, changes)
                    except IllegalTransition as e:
                        # A trainer that breaks the protocol must not wedge the job
                        # (or loop resending the same batch): fail the job instead.
                        self.protocol_violation(session, job, changes, str(e))
                acked = report.sequence
            attempt.last_report_seq = acked
            if token is not None:
                attempt.heartbeat_time = utcnow()
            self._check_budget(session, job, changes)
            stop = attempt.stop_requested
        self.publish(changes)
        return acked, stop

    async def _apply(
        self,
        session: AsyncSession,
        job: JobRow,
        attempt: AttemptRow,
        report: Report,
        changes: Changes,
    ) -> None:
        body = report.body
        now = report.time
        if isinstance(body, MetricValues):
            job.last_metric_seq += 1
            row = MetricRow(
                job_id=job.id,
                seq=job.last_metric_seq,
                attempt=attempt.number,
                step=body.step,
                epoch=body.epoch,
                time=now,
                **body.values,
            )
            session.add(row)
            changes.metrics[job.id].append(row)
            latest = dict(job.latest_metrics or {})
            latest.update({k: v for k, v in body.values.items() if v is not None})
            latest.update(
                step=body.step,
                epoch=body.epoch,
                attempt=attempt.number,
                time=now.isoformat(),
                seq=row.seq,
            )
            job.latest_metrics = latest
            if "train_loss" in body.values and attempt.number == job.attempt_count:
                self._note_progress(session, job, attempt, body.step, now, changes)
            self.touch(job, changes)
        elif isinstance(body, ProgressUpdate):
            job.current_step = body.current_step
            job.total_steps = body.total_steps
            job.epoch = body.epoch
            job.total_epochs = body.total_epochs or job.total_epochs
            job.progress_time = now
            if body.total_steps:
                self.stage(
                    job,
                    StageName.TRAINING,
                    None,
                    None,
                    min(1.0, body.current_step / body.total_steps),
                    now,
                )
            self.touch(job, changes)
        elif isinstance(body, StageUpdate):
            await self._apply_stage(session, job, attempt, body, now, changes)
        elif isinstance(body, EventInput):
            restored = body.payload.get("step")  # a number in a Struct: a float on the wire
            if (
                body.code == "RESUMED_FROM_CHECKPOINT"
                and isinstance(restored, int | float)
                and 0 <= restored < 2**53
                and float(restored).is_integer()
            ):
                # The checkpoint the attempt restored, which the server may not
                # know of (the previous attempt died before reporting it).
                attempt.resumed_from_step = int(restored)
            self.event(
                session,
                job,
                changes,
                body.type,
                body.code,
                body.message,
                body.payload,
                attempt.number,
                now,
            )
        elif isinstance(body, CheckpointInput):
            ckpt = CheckpointRow(
                id=new_id("ckpt"),
                job_id=job.id,
                attempt=attempt.number,
                step=body.step,
                epoch=body.epoch,
                path=body.path,
                size_bytes=body.size_bytes,
                manifest_sha256=body.manifest_sha256,
                create_time=now,
            )
            session.add(ckpt)
            job.checkpoint_count += 1
            job.latest_checkpoint = {
                "id": ckpt.id,
                "attempt": ckpt.attempt,
                "step": ckpt.step,
                "epoch": ckpt.epoch,
                "create_time": now.isoformat(),
                "size_bytes": ckpt.size_bytes,
                "manifest_sha256": ckpt.manifest_sha256,
            }
            self.touch(job, changes)
        elif isinstance(body, AttemptOutcome):
            attempt.result = {
                "outcome": body.outcome,
                "adapter_path": body.adapter_path,
                "final_eval_loss": body.final_eval_loss,
                "final_perplexity": body.final_perplexity,
                "final_train_loss": body.final_train_loss,
                "failure": body.failure,
                "last_step": body.last_step,
            }
            await self._conclude(session, job, attempt, changes)

    async def _apply_stage(
        self,
        session: AsyncSession,
        job: JobRow,
        attempt: AttemptRow,
        update: StageUpdate,
        now: datetime,
        changes: Changes,
    ) -> None:
        if attempt.number != job.attempt_count:
            return  # a stale attempt's late report
        self.stage(job, update.stage, update.status, update.message, update.progress, now)
        state = JobState(job.state)
        target = STAGE_STATE[update.stage]
        if update.stage is StageName.FINALIZATION and update.status == "running" and attempt.first_step_time is None:
            # Restored the final checkpoint: nothing left to train, so this is
            # where the attempt resumed (an interruption after the last step).
            attempt.first_step_time = now
            known = int(job.latest_checkpoint["step"]) if job.latest_checkpoint else 0
            self._resumed(session, job, attempt, max(attempt.resumed_from_step or 0, known), now, changes)
        if update.status == "running" and state in ACTIVE and state is not JobState.CANCELLING and state is not target:
            if can_transition(state, target):
                self.set_state(
                    session,
                    job,
                    target,
                    changes,
                    update.message or f"{target.value.replace('_', ' ')}",
                )
            else:
                self.event(
                    session,
                    job,
                    changes,
                    "warning",
                    "STAGE_OUT_OF_ORDER",
                    f"Trainer reported stage {update.stage.value} while the job is {state.value}",
                    {"stage": update.stage.value, "state": state.value},
                    attempt.number,
                    now,
                )
        elif update.status == "succeeded":
            stage = self.find_stage(job, update.stage)
            seconds = _stage_seconds(stage)
            self.event(
                session,
                job,
                changes,
                "status",
                "STAGE_COMPLETED",
                f"{update.stage.value.replace('_', ' ').capitalize()} completed in {_human(seconds)}",
                {"stage": update.stage.value, "duration_seconds": seconds},
                attempt.number,
                now,
            )
        else:
            self.touch(job, changes)

    async def _conclude(self, session: AsyncSession, job: JobRow, attempt: AttemptRow, changes: Changes) -> None:
        """Act on an attempt's reported result."""
        result = attempt.result or {}
        state = JobState(job.state)
        now = utcnow()
        if state in TERMINAL:
            return
        outcome = result.get("outcome")
        if state is JobState.CANCELLING:
            if outcome == "succeeded":
                self.event(
                    session,
                    job,
                    changes,
                    "info",
                    "ADAPTER_NOT_PUBLISHED",
                    "Training finished as the cancel arrived; the staged adapter is kept but not published",
                    {"adapter_path": result.get("adapter_path")},
                )
            self.finish_cancel(session, job, changes, now)
        elif outcome == "succeeded":
            if state is JobState.TRAINING:
                # Success implies finalization ran even if its stage report was lost.
                self.stage(job, StageName.FINALIZATION, "running", "Finalizing", 0.0, now)
                self.set_state(session, job, JobState.FINALIZATION, changes, "Finalizing")
                state = JobState.FINALIZATION
            if state is JobState.FINALIZATION:
                await self._publish_adapter(session, job, attempt, result, changes, now)
            else:
                doc = self.failure_doc(
                    FailureClass.INTERNAL,
                    f"the trainer reported success while the job was {state.value}",
                    stage=None,
                    step=last_step(job),
                )
                self.fail(session, job, changes, doc, now)
        elif outcome == "failed":
            failure = dict(result.get("failure") or {})
            # A reported failure is classified by its content; one without any is
            # internal (never the "process died" branch, which would retry it).
            classified = self._rules.classify(
                exception_type=str(failure.get("exception_type", "")),
                message=str(failure.get("message", "")) or "the trainer reported a failure without details",
                stage=str(failure.get("stage", "")),
            )
            hinted = str(failure.get("failure_class") or "")
            cls = FailureClass(hinted) if hinted in FailureClass.__members__.values() else classified.failure_class
            doc = self.failure_doc(
                cls,
                str(failure.get("message", "")) or "trainer reported a failure",
                stage=StageName(failure["stage"]) if failure.get("stage") in StageName.__members__.values() else None,
                step=int(failure.get("step", job.current_step)),
                exception_type=str(failure.get("exception_type", "")),
                log_tail=list(failure.get("log_tail", [])),
                evidence=classified.evidence,
            )
            self.settle_failure(session, job, attempt, doc, now, changes)
        elif outcome == "stopped":
            if state is JobState.PAUSING:
                self.finish_pause(session, job, changes, now)
                return
            doc = self._stop_failure(job, attempt)
            self.settle_failure(session, job, attempt, doc, now, changes)

    def _stop_failure(self, job: JobRow, attempt: AttemptRow, **extra: Any) -> dict[str, Any]:
        """The failure document for an attempt that stopped (or died) without
        reporting a failure: a stall or timeout the server enforced, or a
        preemption it did not ask for."""
        stage = StageName(job.state) if job.state in StageName.__members__.values() else None
        if attempt.stop_reason == "stall":
            return self.failure_doc(
                FailureClass.STALL,
                "no training progress for too long; the worker was stopped",
                stage=stage,
                step=last_step(job),
                **extra,
            )
        if attempt.stop_reason == "timeout":
            hours = float(job.compute["max_duration_seconds"]) / 3600
            return self.failure_doc(
                FailureClass.TRAINING_TIMEOUT,
                f"the job ran longer than its maximum duration of {hours:g} h",
                stage=stage,
                step=last_step(job),
                **extra,
            )
        if "signal" in extra or "exit_code" in extra:
            classified = self._rules.classify(exit_code=extra.get("exit_code"), signal=extra.get("signal"))
            how = (
                f"signal {extra.get('signal')}"
                if extra.get("signal") is not None
                else f"exit code {extra.get('exit_code')}"
            )
            return self.failure_doc(
                classified.failure_class,
                f"the trainer process ended ({how}) without reporting a result",
                stage=stage,
                step=last_step(job),
                evidence=classified.evidence,
                **extra,
            )
        classified = self._rules.classify(stopped_unrequested=True)
        return self.failure_doc(
            classified.failure_class,
            "the trainer checkpointed and stopped on a termination signal the server did not send (preemption)",
            stage=stage,
            step=last_step(job),
            evidence=classified.evidence,
            signal=15,
        )

    async def _publish_adapter(
        self,
        session: AsyncSession,
        job: JobRow,
        attempt: AttemptRow,
        result: dict[str, Any],
        changes: Changes,
        now: datetime,
    ) -> None:
        """Publish the staged adapter atomically, then complete the job."""
        staged = (self.job_dir(job.id) / str(result.get("adapter_path") or "staging/adapter")).resolve()
        if self.job_dir(job.id).resolve() not in staged.parents:
            staged = self.job_dir(job.id) / "staging" / "adapter"
        artifact_id = new_id("art")
        target = self._data_dir / "artifacts" / artifact_id
        try:
            files = {p.name: _sha256_file(p) for p in sorted(staged.iterdir()) if p.is_file()}
            if "adapter_config.json" not in files:
                raise FileNotFoundError(f"adapter_config.json missing from {staged}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            _fsync_dir(target.parent)
        except OSError as e:
            doc = self.failure_doc(
                FailureClass.FILE_IO,
                f"publishing the adapter failed: {e}",
                stage=StageName.FINALIZATION,
                step=last_step(job),
                exception_type=type(e).__name__,
            )
            self.fail(session, job, changes, doc, now)
            return
        size = sum((target / name).stat().st_size for name in files)
        session.add(
            ArtifactRow(
                id=artifact_id,
                job_id=job.id,
                kind="adapter",
                status="stored",
                path=str(target),
                size_bytes=size,
                sha256=hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
                files=files,
                create_time=now,
            )
        )
        duration = (now - job.start_time).total_seconds() if job.start_time else 0.0
        job.output = {
            "artifact_id": artifact_id,
            "adapter_path": str(target),
            "final_eval_loss": result.get("final_eval_loss"),
            "final_perplexity": result.get("final_perplexity"),
            "final_train_loss": result.get("final_train_loss"),
            "duration_seconds": duration,
        }
        for stage in job.stages:
            if stage["status"] in ("running", "pending") and stage["stage"] == StageName.FINALIZATION.value:
                self.stage(job, StageName.FINALIZATION, "succeeded", "Adapter published", 1.0, now)
        job.end_time = now
        self.set_state(session, job, JobState.COMPLETED, changes, f"Completed; adapter {artifact_id} published")
        loss = result.get("final_eval_loss")
        self.event(
            session,
            job,
            changes,
            "status",
            "JOB_COMPLETED",
            f"Training completed in {_human(duration)}"
            + (f"; final eval loss {loss:.4f}" if isinstance(loss, float) else ""),
            {"artifact_id": artifact_id, "adapter_path": str(target), "final_eval_loss": loss},
        )

    async def attempt_exited(
        self,
        attempt_id: str,
        *,
        exit_code: int | None,
        signal: int | None,
        log_tail: Sequence[str] = (),
    ) -> None:
        """The worker process ended; close the attempt and settle the job."""
        changes = Changes()
        async with self._db.write() as session:
            locked = await self.lock_attempt(session, attempt_id)
            if locked is None or locked[0].end_time is not None:
                return
            attempt, job = locked
            now = utcnow()
            attempt.end_time, attempt.exit_code, attempt.signal = now, exit_code, signal
            outcome = (attempt.result or {}).get("outcome")
            attempt.state = {
                "succeeded": "succeeded",
                "failed": "failed",
                "stopped": "stopped",
            }.get(str(outcome), "lost")
            if attempt.number == job.attempt_count:
                self.close_billing(job, now)
            else:
                job.billed_seconds += (now - attempt.start_time).total_seconds()
            self.touch(job, changes)
            state = JobState(job.state)
            if state in TERMINAL or state in WAITING or attempt.number != job.attempt_count:
                pass  # settled already (a reported result is concluded when it is applied)
            elif state is JobState.CANCELLING:
                self.finish_cancel(session, job, changes, now)
            elif outcome is None:
                doc = self._stop_failure(job, attempt, exit_code=exit_code, signal=signal, log_tail=list(log_tail))
                self.settle_failure(session, job, attempt, doc, now, changes)
            if job.failure is not None and job.failure.get("exit_code") is None and attempt.state == "failed":
                job.failure = {**job.failure, "exit_code": exit_code, "signal": signal}
        self.publish(changes)

    async def enforce_deadlines(self, stall_seconds: float) -> list[str]:
        """Ask running attempts to stop when their job stalled (no training step,
        or a silent trainer, for `stall_seconds`) or outran its max duration.
        Returns the attempts to stop; their exit is settled as stall / timeout."""
        now = utcnow()
        horizon = now - timedelta(seconds=stall_seconds)
        running = [s.value for s in ACTIVE if s not in (JobState.CANCELLING, JobState.PAUSING)]
        changes = Changes()
        stops: list[str] = []
        async with self._db.write() as session:
            rows = await session.execute(
                sa.select(JobRow, AttemptRow)
                .join(AttemptRow, sa.and_(AttemptRow.job_id == JobRow.id, AttemptRow.number == JobRow.attempt_count))
                .where(
                    JobRow.state.in_(running),
                    AttemptRow.end_time.is_(None),
                    ~AttemptRow.stop_requested,
                    AttemptRow.owner == self.replica_id,
                )
            )
            for job, attempt in rows.all():
                active = job.billed_seconds + ((now - job.billing_since).total_seconds() if job.billing_since else 0)
                last_word = attempt.heartbeat_time or attempt.start_time
                if active > float(job.compute["max_duration_seconds"]):
                    reason, message = "timeout", "maximum duration reached; stopping the worker"
                elif job.state == JobState.TRAINING.value and (job.progress_time or attempt.start_time) < horizon:
                    reason, message = "stall", f"no training step for {stall_seconds:g}s; stopping the worker"
                elif last_word < horizon:
                    reason, message = "stall", f"the trainer has been silent for {stall_seconds:g}s; stopping it"
                else:
                    continue
                # Lock job then attempt (the one order; see lock_attempt) before writing.
                locked = await self.lock_attempt(session, attempt.id)
                if locked is None or locked[0].end_time is not None or locked[0].stop_requested:
                    continue
                attempt, job = locked
                attempt.stop_requested, attempt.stop_reason = True, reason
                stops.append(attempt.id)
                self.event(session, job, changes, "warning", reason.upper(), message, {"attempt": attempt.number})
        self.publish(changes)
        return stops

    async def register_replica(self, address: str) -> None:
        async with self._db.write() as session:
            now = utcnow()
            session.add(ReplicaRow(id=self.replica_id, address=address, start_time=now, heartbeat_time=now))

    async def heartbeat(self) -> None:
        async with self._db.write() as session:
            row = await session.get(ReplicaRow, self.replica_id)
            if row is not None:
                row.heartbeat_time = utcnow()

    async def unregister_replica(self) -> None:
        """Leave at once, so the others take over this replica's workers without waiting."""
        async with self._db.write() as session:
            await session.execute(sa.delete(ReplicaRow).where(ReplicaRow.id == self.replica_id))

    async def take_over(self, timeout_seconds: float, *, others_dead: bool = False) -> list[AttemptRow]:
        """Claim running attempts whose owner replica is gone (no heartbeat for
        `timeout_seconds`, or unregistered); this replica watches them now. With
        `others_dead` (this replica holds the store exclusively) every other
        replica is gone, and their rows are removed."""
        horizon = utcnow() - timedelta(seconds=timeout_seconds)
        alive = sa.select(ReplicaRow.id).where(ReplicaRow.heartbeat_time >= horizon)
        owner_gone = AttemptRow.owner != self.replica_id
        if not others_dead:
            owner_gone = sa.and_(owner_gone, AttemptRow.owner.not_in(alive))
        query = sa.select(AttemptRow).where(AttemptRow.end_time.is_(None), owner_gone).limit(100)
        if not self._db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        async with self._db.write() as session:
            if others_dead:
                await session.execute(sa.delete(ReplicaRow).where(ReplicaRow.id != self.replica_id))
            rows = list((await session.scalars(query)).all())
            for attempt in rows:
                log.warning("replica %s takes over attempt %s from %s", self.replica_id, attempt.id, attempt.owner)
                attempt.owner = self.replica_id
        return rows

    async def running_attempts(self) -> list[AttemptRow]:
        async with self._db.read() as session:
            rows = await session.scalars(
                sa.select(AttemptRow).where(AttemptRow.state == "running", AttemptRow.owner == self.replica_id)
            )
            return list(rows.all())

    def _check_budget(self, session: AsyncSession, job: JobRow, changes: Changes) -> None:
        """Raise a warning past 80 % of the estimated cost and an alert past 100 %, once each."""
        tier_cost = (job.estimate or {}).get("cost_spot" if job.compute["pricing_tier"] == "spot" else "cost_on_demand")
        if not tier_cost or JobState(job.state) in TERMINAL:
            return
        high = float(tier_cost["total_usd"][1])
        spend = spend_usd(job, utcnow())
        level = "over_estimate" if spend > high else ("warning" if spend > 0.8 * high else "")
        order = ("", "warning", "over_estimate")
        if order.index(level) <= order.index(job.cost_alert):
            return
        job.cost_alert = level
        percent = 100 * spend / high if high else 0.0
        if level == "warning":
            self.event(
                session,
                job,
                changes,
                "warning",
                "COST_WARNING",
                f"Spend ${spend:.2f} is {percent:.0f}% of the estimate's upper end (${high:.2f})",
                {"spend_usd": spend, "estimate_high_usd": high, "percent": percent},
            )
        else:
            self.event(
                session,
                job,
                changes,
                "error",
                "COST_OVER_ESTIMATE",
                f"Spend ${spend:.2f} exceeds the estimate's upper end (${high:.2f}) at {percent:.0f}%",
                {"spend_usd": spend, "estimate_high_usd": high, "percent": percent},
            )

    def settle_failure(
        self,
        session: AsyncSession,
        job: JobRow,
        attempt: AttemptRow | None,
        doc: dict[str, Any],
        now: datetime,
        changes: Changes,
    ) -> None:
        """An attempt ended badly: recover automatically, escalate, or fail,
        as the failure's class and the job's recovery policy say."""
        state = JobState(job.state)
        if state in TERMINAL:
            return
        if state is JobState.PAUSING:
            # The worker died while pausing: a checkpoint to resume from is all a pause needs.
            if job.checkpoint_count:
                self.finish_pause(session, job, changes, now)
            else:
                self.fail(session, job, changes, doc, now)
            return
        cls = FailureClass(doc["failure_class"])
        policy = recovery.RecoveryPolicy.from_dict(job.recovery_policy)
        decision = recovery.decide(policy, self._rules.policy(cls), job.consecutive_failures, now)
        if decision.action is recovery.Action.FAIL:
            self.fail(session, job, changes, doc, now)
            return
        self._record_interruption(job, attempt, doc, now)
        if decision.action is recovery.Action.RECOVER:
            self.recover(
                session, job, changes, doc, decision.next_attempt_time or now, retry=job.consecutive_failures + 1
            )
            return
        choice = decision.escalation
        retries = policy.max_system_retries
        if choice is recovery.Choice.CANCEL:
            self.set_state(session, job, JobState.CANCELLING, changes, "Recovery budget spent; cancelling per policy")
            self.finish_cancel(session, job, changes, now)
        elif choice in (recovery.Choice.KEEP_TRYING, recovery.Choice.SWITCH_TO_ON_DEMAND):
            if choice is recovery.Choice.SWITCH_TO_ON_DEMAND:
                self.switch_pricing(session, job, changes, PricingTier.ON_DEMAND)
            job.consecutive_failures = 0
            self.recover(session, job, changes, doc, now, retry=1)
        else:
            self.fail_running_stage(job, now, doc["reason"])
            choices = [recovery.Choice.KEEP_TRYING, recovery.Choice.CANCEL]
            if job.compute["pricing_tier"] == PricingTier.SPOT.value:
                choices.insert(1, recovery.Choice.SWITCH_TO_ON_DEMAND)
            reason = f"{retries} automatic recoveries in a row failed; last: {doc['reason']}: {doc['message'][:200]}"
            job.decision = {"reason": reason, "choices": [c.value for c in choices], "since": now.isoformat()}
            job.recovering_class = cls.value
            job.next_attempt_time = None
            self.set_state(session, job, JobState.AWAITING_DECISION, changes, reason)
            self.event(
                session,
                job,
                changes,
                "warning",
                "RECOVERY_ESCALATED",
                reason,
                {"choices": [c.value for c in choices], "failure_class": cls.value},
            )

    def recover(
        self,
        session: AsyncSession,
        job: JobRow,
        changes: Changes,
        doc: Mapping[str, Any],
        at: datetime,
        *,
        retry: int,
    ) -> None:
        """Schedule a new attempt that resumes from the newest verified checkpoint."""
        policy = recovery.RecoveryPolicy.from_dict(job.recovery_policy)
        job.consecutive_failures = retry
        job.next_attempt_time = at
        job.recovering_class = str(doc["failure_class"])
        job.decision = None
        self.fail_running_stage(job, utcnow(), doc["reason"])
        wait = max(0.0, (at - utcnow()).total_seconds())
        where = (
            f"checkpoint at step {job.latest_checkpoint['step']}"
            if job.latest_checkpoint
            else "the start (no checkpoint yet)"
        )
        message = (
            f"{doc['reason']} at step {last_step(job)}; resuming from {where} in {wait:.1f}s "
            f"(automatic retry {retry} of {policy.max_system_retries})"
        )
        self.set_state(session, job, JobState.RECOVERING, changes, message)
        self.event(
            session,
            job,
            changes,
            "warning",
            "RECOVERY_SCHEDULED",
            message,
            {"failure_class": doc["failure_class"], "retry": retry, "next_attempt_time": at.isoformat()},
        )
        if self.control:
            self.control.wake()

    def _record_interruption(
        self, job: JobRow, attempt: AttemptRow | None, doc: Mapping[str, Any], now: datetime
    ) -> None:
        job.interruptions = [
            *job.interruptions,
            {
                "attempt": attempt.number if attempt else job.attempt_count,
                "step": last_step(job),
                "time": now.isoformat(),
                "failure_class": doc["failure_class"],
                "reason": f"{doc['reason']}: {str(doc['message'])[:200]}",
                "resumed_from_step": 0,
                "steps_lost": 0,
                "downtime_seconds": None,
                "cost_overhead_usd": 0.0,
                "recovered": False,
            },
        ]

    def _note_progress(
        self, session: AsyncSession, job: JobRow, attempt: AttemptRow, step: int, now: datetime, changes: Changes
    ) -> None:
        """A training step completed: the attempt made progress, so the
        interruptions before it are recovered and the failure count starts over."""
        job.progress_time = now
        if attempt.first_step_time is not None:
            return
        attempt.first_step_time = now
        self._resumed(session, job, attempt, max(0, step - 1), now, changes)

    def _resumed(
        self, session: AsyncSession, job: JobRow, attempt: AttemptRow, from_step: int, now: datetime, changes: Changes
    ) -> None:
        """The attempt got going again from `from_step` — its first training
        step, or straight to finalization after restoring the final checkpoint.
        Every interruption not yet recovered is recovered now, not only the
        newest: an attempt lost while restarting leaves two behind it."""
        attempt.resumed_from_step = from_step
        job.consecutive_failures = 0
        job.recovering_class = None
        records = [dict(r) for r in job.interruptions]
        pending = [i for i, r in enumerate(records) if not r["recovered"]]
        if not pending:
            return
        sps = (job.latest_metrics or {}).get("steps_per_second")
        for index in pending:
            record = records[index]
            began = datetime.fromisoformat(record["time"])
            downtime = max(0.0, (now - began).total_seconds())
            steps_lost = max(0, int(record["step"]) - from_step)
            if index == len(records) - 1:
                # The attempt that resumed: its start-up, and the steps it redoes.
                redo_seconds = steps_lost / sps if isinstance(sps, int | float) and sps > 0 else 0.0
                overhead_seconds = (now - attempt.start_time).total_seconds() + redo_seconds
            else:
                # A restart that was itself lost: the time until the next interruption.
                overhead_seconds = max(
                    0.0, (datetime.fromisoformat(records[index + 1]["time"]) - began).total_seconds()
                )
            record.update(
                recovered=True,
                resumed_from_step=from_step,
                steps_lost=steps_lost,
                downtime_seconds=downtime,
                cost_overhead_usd=overhead_seconds / 3600 * job.hourly_rate_usd,
            )
        job.interruptions = records
        job.recovered_count += len(pending)
        last = records[-1]
        downtime = last["downtime_seconds"]
        steps_lost = last["steps_lost"]
        again = f" ({len(pending)} interruptions in a row)" if len(pending) > 1 else ""
        self.event(
            session,
            job,
            changes,
            "info",
            "RECOVERED",
            f"Recovered from {last['failure_class'].replace('_', ' ')}{again}: resumed at step {from_step} "
            f"after {records[pending[0]]['downtime_seconds']:.1f}s; {steps_lost} step(s) redone",
            {
                "attempt": attempt.number,
                "resumed_from_step": from_step,
                "steps_lost": steps_lost,
                "downtime_seconds": downtime,
                "interruptions_recovered": len(pending),
            },
            attempt.number,
            now,
        )

    def finish_pause(self, session: AsyncSession, job: JobRow, changes: Changes, now: datetime) -> None:
        stages = [dict(x) for x in job.stages]
        for entry in stages:
            if entry["status"] == "running":
                entry["status"] = "pending"
                entry["message"] = f"Paused at step {job.current_step}"
        job.stages = stages
        job.paused_since = now
        step = job.latest_checkpoint["step"] if job.latest_checkpoint else 0
        self.set_state(session, job, JobState.PAUSED, changes, f"Paused; resumes from the checkpoint at step {step}")

    def switch_pricing(self, session: AsyncSession, job: JobRow, changes: Changes, tier: PricingTier) -> None:
        gpu = resolve_gpu(job.compute["gpu_type"])
        if gpu is None or job.compute["pricing_tier"] == tier.value:
            return
        job.compute = {**job.compute, "pricing_tier": tier.value}
        job.hourly_rate_usd = hourly_rate(gpu, tier)
        self.event(
            session,
            job,
            changes,
            "info",
            "PRICING_CHANGED",
            f"Now on {tier.value.replace('_', '-')} capacity at ${job.hourly_rate_usd:.2f}/h",
            {"pricing_tier": tier.value, "hourly_rate_usd": job.hourly_rate_usd},
        )

    async def force_fail(self, attempt_id: str, message: str) -> None:
        """Last resort when settling an attempt failed: end it and fail its job,
        so no job is left waiting for a worker that is gone."""
        changes = Changes()
        async with self._db.write() as session:
            locked = await self.lock_attempt(session, attempt_id)
            if locked is None:
                return
            attempt, job = locked
            now = utcnow()
            if attempt.end_time is None:
                attempt.end_time, attempt.state = now, "lost"
                self.close_billing(job, now)
            if JobState(job.state) not in TERMINAL:
                self.protocol_violation(session, job, changes, message)
        self.publish(changes)

    def protocol_violation(self, session: AsyncSession, job: JobRow, changes: Changes, message: str) -> None:
        if JobState(job.state) in TERMINAL:
            return
        if JobState(job.state) is JobState.CANCELLING:
            self.finish_cancel(session, job, changes, utcnow())
            return
        doc = self.failure_doc(FailureClass.INTERNAL, message, stage=None, step=last_step(job))
        self.fail(session, job, changes, doc, utcnow())

    # ------------------------------------------------------------------ helpers

    async def lock_attempt(self, session: AsyncSession, attempt_id: str) -> tuple[AttemptRow, JobRow] | None:
        """Lock an attempt and its job in the order every transaction takes them:
        the job first, then the attempt (cancel, pause and the others lock the job
        and then its current attempt). Locking the attempt first deadlocked
        against them on PostgreSQL, a CancelJob racing a trainer's launch or report."""
        job_id = await session.scalar(sa.select(AttemptRow.job_id).where(AttemptRow.id == attempt_id))
        if job_id is None:
            return None
        job = await self.lock_job(session, job_id)
        attempt = await session.get(AttemptRow, attempt_id, with_for_update=True, populate_existing=True)
        return None if attempt is None else (attempt, job)

    async def lock_job(self, session: AsyncSession, job_id: str) -> JobRow:
        job = await session.get(JobRow, job_id, with_for_update=True, populate_existing=True)
        if job is None or not _visible(job):
            raise NotFound("job", job_id)
        return job

    async def current_attempt(self, session: AsyncSession, job: JobRow) -> AttemptRow | None:
        return await session.scalar(
            sa.select(AttemptRow)
            .where(AttemptRow.job_id == job.id, AttemptRow.number == job.attempt_count)
            .with_for_update()
        )

    def set_state(self, session: AsyncSession, job: JobRow, target: JobState, changes: Changes, message: str) -> None:
        current = JobState(job.state)
        job.state = transition(job.id, current, target).value
        job.state_message = message
        self.touch(job, changes)
        self.event(
            session,
            job,
            changes,
            "status",
            "STATE_CHANGED",
            f"{current.value} → {target.value}: {message}",
            {"from": current.value, "to": target.value},
        )

    def touch(self, job: JobRow, changes: Changes) -> None:
        if job.id not in changes.touched:
            job.version += 1
            job.update_time = utcnow()
            changes.touched.add(job.id)
        changes.jobs[job.id] = job

    def event(
        self,
        session: AsyncSession,
        job: JobRow,
        changes: Changes,
        type_: str,
        code: str,
        message: str,
        payload: dict[str, Any] | None = None,
        attempt: int = 0,
        time: datetime | None = None,
    ) -> None:
        job.last_event_seq += 1
        row = EventRow(
            job_id=job.id,
            seq=job.last_event_seq,
            type=type_,
            code=code,
            message=message,
            payload=payload or {},
            attempt=attempt,
            time=time or utcnow(),
        )
        session.add(row)
        changes.events[job.id].append(row)
        self.touch(job, changes)

    @staticmethod
    def find_stage(job: JobRow, stage: StageName) -> dict[str, Any]:
        for entry in job.stages:
            if entry["stage"] == stage.value:
                return dict(entry)
        return {
            "stage": stage.value,
            "status": "pending",
            "attempt": job.attempt_count,
            "message": "",
            "progress": 0.0,
        }

    def stage(
        self,
        job: JobRow,
        stage: StageName,
        status: str | None,
        message: str | None,
        progress: float,
        now: datetime,
    ) -> None:
        """Update one stage; starting a stage completes the ones before it."""
        stages = [dict(s) for s in job.stages] or [
            {
                "stage": s.value,
                "status": "pending",
                "attempt": job.attempt_count,
                "message": "",
                "progress": 0.0,
            }
            for s in STAGE_ORDER
        ]
        index = STAGE_ORDER.index(stage)
        for i, entry in enumerate(stages):
            if i < index and status == "running" and entry["status"] in ("pending", "running"):
                entry["status"] = "succeeded"
                entry["progress"] = 1.0
                entry.setdefault("start_time", _iso(now))
                entry["end_time"] = entry.get("end_time") or _iso(now)
            if i == index:
                if status is not None:
                    if status == "running" and entry["status"] == "pending":
                        entry["start_time"] = _iso(now)
                    if status == "succeeded":
                        entry["end_time"] = _iso(now)
                        entry.setdefault("start_time", _iso(now))
                        progress = 1.0
                    entry["status"] = status
                if message is not None and message:
                    entry["message"] = message
                entry["progress"] = max(0.0, min(1.0, progress))
        job.stages = stages

    def close_billing(self, job: JobRow, now: datetime) -> None:
        if job.billing_since is not None:
            job.billed_seconds += max(0.0, (now - job.billing_since).total_seconds())
            job.billing_since = None

    def finish_cancel(self, session: AsyncSession, job: JobRow, changes: Changes, now: datetime) -> None:
        self.fail_running_stage(job, now, "Cancelled")
        job.end_time = now
        spend = job.billed_seconds / 3600 * job.hourly_rate_usd
        self.set_state(session, job, JobState.CANCELLED, changes, f"Cancelled; final cost ${spend:.2f}")

    def fail(
        self,
        session: AsyncSession,
        job: JobRow,
        changes: Changes,
        failure: dict[str, Any],
        now: datetime,
    ) -> None:
        self.fail_running_stage(job, now, failure.get("reason", "Failed"))
        job.failure = failure
        job.end_time = now
        self.set_state(
            session,
            job,
            JobState.FAILED,
            changes,
            f"{failure['reason']}: {failure['message'][:200]}",
        )
        self.event(
            session,
            job,
            changes,
            "error",
            "JOB_FAILED",
            f"{failure['reason']}: {failure['message'][:500]}",
            {"failure_class": failure["failure_class"], "retryable": failure["retryable"], "step": failure["step"]},
        )

    def fail_running_stage(self, job: JobRow, now: datetime, message: str) -> None:
        stages = [dict(s) for s in job.stages]
        for entry in stages:
            if entry["status"] == "running":
                entry["status"] = "failed"
                entry["end_time"] = _iso(now)
                entry["message"] = message
        job.stages = stages

    def failure_doc(
        self,
        cls: FailureClass,
        message: str,
        *,
        stage: StageName | None,
        step: int,
        exception_type: str = "",
        exit_code: int | None = None,
        signal: int | None = None,
        log_tail: list[str] | None = None,
        evidence: list[str] | None = None,
    ) -> dict[str, Any]:
        policy = self._rules.policy(cls)
        return {
            "failure_class": cls.value,
            "reason": policy.reason,
            "message": message,
            "stage": stage.value if stage else None,
            "step": step,
            "retryable": policy.retryable,
            "origin": policy.origin,
            "recovery": policy.recovery,
            "exception_type": exception_type,
            "exit_code": exit_code,
            "signal": signal,
            "log_tail": (log_tail or [])[-50:],
            "evidence": evidence or [],
        }

    def publish(self, changes: Changes) -> None:
        for job_id, metric_rows in changes.metrics.items():
            self._publisher.metrics_added(job_id, metric_rows)
        for job_id, event_rows in changes.events.items():
            self._publisher.events_added(job_id, event_rows)
        for job in changes.jobs.values():
            self._publisher.job_changed(job)
        if self.control:
            for attempt_id in changes.stops:
                self.control.request_stop(attempt_id)


#: Longest search text of ListJobs / ExportJobs.
MAX_SEARCH_CHARS = 256


@dataclass(frozen=True, slots=True)
class Backoffs:
    """What the scheduler needs to know about retries that are not due yet."""

    #: Per pool, jobs in their recovery backoff whose lost worker ran on this
    #: replica. Each keeps the slot that worker held: a queued job taking it would
    #: make the recovery wait for that whole job (once due, claim_next starts
    #: recovering jobs first).
    reserved: dict[str, int]
    #: When the next retry falls due (None: none waiting), so the scheduler can
    #: start it then rather than at its next tick.
    next_due: datetime | None


_RETRYING = [JobState.RECOVERING.value, JobState.PROVISIONING.value]


def claimable(now: datetime, *, sqlite: bool) -> Any:
    """Jobs the scheduler may start now: queued ones, and recovering ones whose
    backoff has passed and whose previous worker has exited (so two trainers
    never share a checkpoint directory).

    The leading ``state IN (...)`` (implied by the OR) lets the planner read the
    few waiting jobs from the state index; without it the OR scans every job ever
    run (168 ms at 100k jobs). SQLite's statistics, where ANALYZE ran, know only
    the average number of jobs per state, not that waiting ones are few:
    likelihood() says so."""
    waiting: Any = JobRow.state.in_([JobState.QUEUED.value, *_RETRYING])
    if sqlite:
        waiting = sa.func.likelihood(waiting, sa.literal_column("0.001"))
    open_attempt = sa.exists().where(AttemptRow.job_id == JobRow.id, AttemptRow.end_time.is_(None))
    retry_due = sa.and_(JobRow.state.in_(_RETRYING), JobRow.next_attempt_time <= now, ~open_attempt)
    return sa.and_(waiting, sa.or_(JobRow.state == JobState.QUEUED.value, retry_due))


#: Queue order, one definition for the scheduler and the queue view: recovering
#: jobs first (they held a slot), then promoted jobs (latest promotion first),
#: then everyone else by creation time.
QUEUE_ORDER: list[Any] = [
    sa.case((JobRow.state.in_([JobState.RECOVERING.value, JobState.PROVISIONING.value]), 0), else_=1),
    sa.case((JobRow.promote_time.is_(None), 1), else_=0),
    JobRow.promote_time.desc(),
    JobRow.create_time,
    JobRow.id,
]


def _visible(job: JobRow) -> bool:
    """A job is visible to system work and to callers of its own project only."""
    who = caller.current()
    return who.system or job.project == who.project


_GPU_TYPE: Any = JobRow.compute["gpu_type"].as_string()
_PRICING_TIER: Any = JobRow.compute["pricing_tier"].as_string()
_SPEND: Any = JobRow.billed_seconds * JobRow.hourly_rate_usd / 3600.0
_PROGRESS: Any = sa.case(
    (JobRow.total_steps > 0, sa.cast(JobRow.current_step, sa.Float) / JobRow.total_steps), else_=0.0
)
#: Sortable columns: (expression, JSON kind of its page-token value).
_SORTS: dict[str, tuple[Any, str]] = {
    "create_time": (JobRow.create_time, "datetime"),
    "update_time": (JobRow.update_time, "datetime"),
    "name": (JobRow.name, "str"),
    "state": (JobRow.state, "str"),
    "preset": (JobRow.preset, "str"),
    "base_model": (JobRow.base_model, "str"),
    "created_by": (JobRow.created_by, "str"),
    "gpu_type": (_GPU_TYPE, "str"),
    "spend_usd": (_SPEND, "float"),
    "progress": (_PROGRESS, "float"),
}
#: The page-token key kind of each sort column kind.
_TOKEN_KINDS: dict[str, KeyKind] = {"datetime": "time", "str": "str", "float": "float"}
EXPORT_COLUMNS = [
    "id", "name", "state", "preset", "custom", "base_model", "dataset_id", "gpu_type", "pricing_tier",
    "created_by", "create_time", "start_time", "end_time", "current_step", "total_steps", "spend_usd",
    "final_eval_loss", "labels", "description",
]  # fmt: skip


def _parse_order(text: str) -> tuple[str, bool]:
    parts = text.split()
    if not parts:
        return "create_time", True
    name = parts[0]
    direction = parts[1].lower() if len(parts) > 1 else ("desc" if name in ("create_time", "update_time") else "asc")
    if name not in _SORTS or direction not in ("asc", "desc") or len(parts) > 2:
        allowed = ", ".join(sorted(_SORTS))
        raise InvalidArgument([FieldViolation("order_by", f"must be a column and asc or desc; columns: {allowed}")])
    return name, direction == "desc"


def _sort_value(name: str, job: JobRow) -> Any:
    kind = _SORTS[name][1]
    if name == "gpu_type":
        return job.compute["gpu_type"]
    if name == "spend_usd":
        return job.billed_seconds * job.hourly_rate_usd / 3600.0
    if name == "progress":
        return job.current_step / job.total_steps if job.total_steps else 0.0
    value = getattr(job, name)
    return value.isoformat() if kind == "datetime" else value


def _decode_sort_value(name: str, value: Any) -> Any:
    return datetime.fromisoformat(value) if _SORTS[name][1] == "datetime" else value


def _export_row(job: JobRow, now: datetime) -> list[Any]:
    return [
        job.id, job.name, job.state, job.preset, job.custom, job.base_model, job.dataset_id,
        job.compute["gpu_type"], job.compute["pricing_tier"], job.created_by, job.create_time.isoformat(),
        _iso(job.start_time) or "", _iso(job.end_time) or "", job.current_step, job.total_steps,
        f"{spend_usd(job, now):.4f}", (job.output or {}).get("final_eval_loss", ""),
        json.dumps(job.labels, sort_keys=True), job.description,
    ]  # fmt: skip


def _job_state_value(text: str) -> str:
    try:
        return JobState(text.lower()).value
    except ValueError:
        raise ValueError("one of " + ", ".join(s.name for s in JobState)) from None


def _preset_value(text: str) -> str:
    try:
        return cfg.PresetName(text.lower()).value
    except ValueError:
        raise ValueError("one of " + ", ".join(p.name for p in cfg.PresetName)) from None


def _tier_value(text: str) -> str:
    try:
        return PricingTier(text.lower()).value
    except ValueError:
        raise ValueError("one of SPOT, ON_DEMAND") from None


def _float_value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("a number") from None


def _timestamp_value(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("an RFC 3339 timestamp such as 2026-01-31T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_JOB_FILTERS: dict[str, Callable[[str], Any]] = {
    "state": _job_state_value,
    "dataset_id": str,
    "base_model": str,
    "preset": _preset_value,
    "name": str,
    "create_time": _timestamp_value,
    "created_by": str,
    "gpu_type": str,
    "pricing_tier": _tier_value,
    "spend_usd": _float_value,
}
_JOB_COLUMNS: dict[str, Any] = {
    "created_by": JobRow.created_by,
    "gpu_type": _GPU_TYPE,
    "pricing_tier": _PRICING_TIER,
    "spend_usd": _SPEND,
    "state": JobRow.state,
    "dataset_id": JobRow.dataset_id,
    "base_model": JobRow.base_model,
    "preset": JobRow.preset,
    "name": JobRow.name,
    "create_time": JobRow.create_time,
}


def last_step(job: JobRow) -> int:
    """The last optimiser step the job completed, from progress or metrics."""
    return max(job.current_step, int((job.latest_metrics or {}).get("step", 0)))


def spend_usd(job: JobRow, now: datetime) -> float:
    running = (now - job.billing_since).total_seconds() if job.billing_since is not None else 0.0
    return (job.billed_seconds + running) / 3600 * job.hourly_rate_usd


def _stage_seconds(stage: Mapping[str, Any]) -> float:
    start, end = stage.get("start_time"), stage.get("end_time")
    if not start:
        return 0.0
    stop = datetime.fromisoformat(end) if end else utcnow()
    return max(0.0, (stop - datetime.fromisoformat(start)).total_seconds())


def _human(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, text: str) -> None:
    """Write a file readable only by its owner (the spec holds the attempt token)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
