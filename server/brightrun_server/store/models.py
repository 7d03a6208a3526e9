"""SQLAlchemy 2 models. The schema changes only through Alembic migrations
(store/migrations); `tests/server/test_store.py` checks the two agree."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: JSON everywhere, JSONB on PostgreSQL.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


class Base(DeclarativeBase):
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
    }


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(256))
    filename: Mapped[str] = mapped_column(sa.String(256))
    format: Mapped[str] = mapped_column(sa.String(32))
    state: Mapped[str] = mapped_column(sa.String(16))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    path: Mapped[str] = mapped_column(sa.Text)
    stats: Mapped[dict[str, Any]]
    validation: Mapped[dict[str, Any]]
    create_time: Mapped[datetime]
    delete_time: Mapped[datetime | None]
    #: Idempotency key, unique within the project.
    request_id: Mapped[str | None] = mapped_column(sa.String(128))
    project: Mapped[str] = mapped_column(sa.String(64), default="default")

    __table_args__ = (
        sa.Index("ix_datasets_create_time", "create_time", "id"),
        sa.UniqueConstraint("project", "request_id", name="uq_datasets_project_request_id"),
    )


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(256))
    dataset_id: Mapped[str] = mapped_column(sa.ForeignKey("datasets.id"))
    base_model: Mapped[str] = mapped_column(sa.String(512))
    preset: Mapped[str] = mapped_column(sa.String(16))
    custom: Mapped[bool]
    params: Mapped[dict[str, Any]]
    compute: Mapped[dict[str, Any]]
    labels: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(sa.String(32))
    state_message: Mapped[str] = mapped_column(sa.Text, default="")
    #: Idempotency key, unique within the project.
    request_id: Mapped[str | None] = mapped_column(sa.String(128))
    request_hash: Mapped[str | None] = mapped_column(sa.String(64))
    fingerprint: Mapped[str] = mapped_column(sa.String(64))
    version: Mapped[int] = mapped_column(sa.BigInteger, default=1)
    create_time: Mapped[datetime]
    update_time: Mapped[datetime]
    start_time: Mapped[datetime | None]
    end_time: Mapped[datetime | None]
    current_step: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    total_steps: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    epoch: Mapped[float] = mapped_column(sa.Float, default=0.0)
    total_epochs: Mapped[int] = mapped_column(default=0)
    #: Latest value of each metric (a MetricPoint as a dict).
    latest_metrics: Mapped[dict[str, Any] | None]
    #: Stages of the current attempt (JobStage dicts, in order).
    stages: Mapped[list[Any]]
    latest_checkpoint: Mapped[dict[str, Any] | None]
    checkpoint_count: Mapped[int] = mapped_column(default=0)
    cancel_reason: Mapped[str | None] = mapped_column(sa.String(32))
    cancel_note: Mapped[str | None] = mapped_column(sa.Text)
    cancel_time: Mapped[datetime | None]
    failure: Mapped[dict[str, Any] | None]
    output: Mapped[dict[str, Any] | None]
    attempt_count: Mapped[int] = mapped_column(default=0)
    last_metric_seq: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    last_event_seq: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    hourly_rate_usd: Mapped[float] = mapped_column(sa.Float)
    #: Seconds billed by attempts that have ended; a running attempt adds its own.
    billed_seconds: Mapped[float] = mapped_column(sa.Float, default=0.0)
    #: When the running attempt started billing; None while no worker runs.
    billing_since: Mapped[datetime | None]
    #: The estimate made at creation (services/estimation.py document).
    estimate: Mapped[dict[str, Any] | None]
    #: Effective recovery policy (domain/recovery.py RecoveryPolicy as a dict).
    recovery_policy: Mapped[dict[str, Any]]
    #: System failures in a row since the last attempt that made progress.
    consecutive_failures: Mapped[int] = mapped_column(default=0)
    recovered_count: Mapped[int] = mapped_column(default=0)
    next_attempt_time: Mapped[datetime | None]
    recovering_class: Mapped[str | None] = mapped_column(sa.String(32))
    #: Interruption records, oldest first.
    interruptions: Mapped[list[Any]]
    #: Pending decision while awaiting one.
    decision: Mapped[dict[str, Any] | None]
    paused_seconds: Mapped[float] = mapped_column(sa.Float, default=0.0)
    paused_since: Mapped[datetime | None]
    #: When the job last made training progress (a step); for stall detection.
    progress_time: Mapped[datetime | None]
    retry_of: Mapped[str | None] = mapped_column(sa.String(40))
    retry_number: Mapped[int] = mapped_column(default=0)
    root_job_id: Mapped[str] = mapped_column(sa.String(40))
    resumed_from_job_id: Mapped[str | None] = mapped_column(sa.String(40))
    resumed_from_checkpoint_id: Mapped[str | None] = mapped_column(sa.String(40))
    #: Checkpoint directory the first attempt resumes from (continuations).
    resume_checkpoint_path: Mapped[str | None] = mapped_column(sa.Text)
    lr_schedule_mode: Mapped[str] = mapped_column(sa.String(16), default="continue")
    applied_fixes: Mapped[list[Any]]
    description: Mapped[str] = mapped_column(sa.Text, default="")
    created_by: Mapped[str] = mapped_column(sa.String(128), default="")
    project: Mapped[str] = mapped_column(sa.String(64), default="default")
    #: Compute pool the job runs in ("local", "simulated-cloud").
    pool: Mapped[str] = mapped_column(sa.String(32), default="local")
    #: When the job was promoted to the front of the queue.
    promote_time: Mapped[datetime | None]
    #: Provisioning progress: attempt, max_attempts, last_outcome, next_attempt_time.
    provisioning: Mapped[dict[str, Any] | None]
    #: Warnings raised at creation.
    warnings: Mapped[list[Any]]
    #: Highest budget alert raised so far: "" | "warning" | "over_estimate".
    cost_alert: Mapped[str] = mapped_column(sa.String(16), default="")
    #: Seconds billed to interruptions (restarts and redone steps), included in billed_seconds.
    overhead_seconds: Mapped[float] = mapped_column(sa.Float, default=0.0)

    __table_args__ = (
        sa.UniqueConstraint("project", "request_id", name="uq_jobs_project_request_id"),
        sa.Index("ix_jobs_state_create_time", "state", "create_time", "id"),
        sa.Index("ix_jobs_create_time", "create_time", "id"),
        sa.Index("ix_jobs_dataset_id", "dataset_id"),
        sa.Index("ix_jobs_fingerprint", "fingerprint"),
        sa.Index("ix_jobs_root_job_id", "root_job_id"),
        sa.Index("ix_jobs_project_create_time", "project", "create_time", "id"),
        sa.Index("ix_jobs_project_state_create_time", "project", "state", "create_time", "id"),
    )


class AttemptRow(Base):
    __tablename__ = "job_attempts"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id"))
    number: Mapped[int]
    #: running | succeeded | failed | stopped | lost
    state: Mapped[str] = mapped_column(sa.String(16))
    token_hash: Mapped[str] = mapped_column(sa.String(64))
    pid: Mapped[int | None]
    start_time: Mapped[datetime]
    end_time: Mapped[datetime | None]
    heartbeat_time: Mapped[datetime | None]
    exit_code: Mapped[int | None]
    signal: Mapped[int | None]
    last_report_seq: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    stop_requested: Mapped[bool] = mapped_column(default=False)
    #: When the worker started billing (its launch), and at what rate.
    launch_time: Mapped[datetime | None]
    hourly_rate_usd: Mapped[float] = mapped_column(sa.Float, default=0.0)
    pool: Mapped[str] = mapped_column(sa.String(32), default="local")
    #: The server replica watching the worker.
    owner: Mapped[str] = mapped_column(sa.String(40), default="")
    #: Why the server asked the attempt to stop: cancel | pause | stall | timeout.
    stop_reason: Mapped[str | None] = mapped_column(sa.String(16))
    #: When the attempt completed its first training step (recovery downtime ends).
    first_step_time: Mapped[datetime | None]
    #: The step the attempt resumed from (0 for a fresh start).
    resumed_from_step: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    #: The trainer's AttemptResult as a dict, once reported.
    result: Mapped[dict[str, Any] | None]
    #: This attempt's stages, archived from the job when the next attempt starts.
    stages: Mapped[list[Any]]

    __table_args__ = (
        sa.UniqueConstraint("job_id", "number", name="uq_job_attempts_job_number"),
        sa.Index("ix_job_attempts_state", "state"),
    )


class MetricRow(Base):
    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    attempt: Mapped[int]
    step: Mapped[int] = mapped_column(sa.BigInteger)
    epoch: Mapped[float] = mapped_column(sa.Float)
    time: Mapped[datetime]
    train_loss: Mapped[float | None] = mapped_column(sa.Float)
    eval_loss: Mapped[float | None] = mapped_column(sa.Float)
    learning_rate: Mapped[float | None] = mapped_column(sa.Float)
    grad_norm: Mapped[float | None] = mapped_column(sa.Float)
    tokens_per_second: Mapped[float | None] = mapped_column(sa.Float)
    steps_per_second: Mapped[float | None] = mapped_column(sa.Float)
    memory_used_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    memory_peak_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    gpu_utilization: Mapped[float | None] = mapped_column(sa.Float)
    perplexity: Mapped[float | None] = mapped_column(sa.Float)


class EventRow(Base):
    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    type: Mapped[str] = mapped_column(sa.String(16))
    code: Mapped[str] = mapped_column(sa.String(64))
    message: Mapped[str] = mapped_column(sa.Text)
    payload: Mapped[dict[str, Any]]
    attempt: Mapped[int]
    time: Mapped[datetime]


class CheckpointRow(Base):
    __tablename__ = "job_checkpoints"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id"))
    attempt: Mapped[int]
    step: Mapped[int] = mapped_column(sa.BigInteger)
    epoch: Mapped[float] = mapped_column(sa.Float)
    path: Mapped[str] = mapped_column(sa.Text)
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    manifest_sha256: Mapped[str] = mapped_column(sa.String(64))
    create_time: Mapped[datetime]

    __table_args__ = (sa.Index("ix_job_checkpoints_job_step", "job_id", "step"),)


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(sa.String(16))
    #: stored | testing | production | archived
    status: Mapped[str] = mapped_column(sa.String(16))
    path: Mapped[str] = mapped_column(sa.Text)
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    files: Mapped[dict[str, Any]]
    create_time: Mapped[datetime]

    __table_args__ = (sa.Index("ix_artifacts_job_id", "job_id"),)


class FixOutcomeRow(Base):
    """A retry made with a suggested fix. Its outcome is its job's state
    (completed or not), so confidence is a join, never a stale copy."""

    __tablename__ = "fix_outcomes"

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    failure_class: Mapped[str] = mapped_column(sa.String(32))
    fix_id: Mapped[str] = mapped_column(sa.String(64))
    source_job_id: Mapped[str] = mapped_column(sa.String(40))
    retry_job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id"))
    create_time: Mapped[datetime]

    __table_args__ = (
        sa.Index("ix_fix_outcomes_class_fix", "failure_class", "fix_id"),
        sa.Index("ix_fix_outcomes_retry_job_id", "retry_job_id"),
    )


class QueueAuditRow(Base):
    """A change to the queue's order: who, when, why, and whom it delayed."""

    __tablename__ = "queue_audit"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    project: Mapped[str] = mapped_column(sa.String(64))
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id"))
    action: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str] = mapped_column(sa.String(32))
    justification: Mapped[str] = mapped_column(sa.Text)
    actor: Mapped[str] = mapped_column(sa.String(128))
    time: Mapped[datetime]
    delayed: Mapped[list[Any]]

    __table_args__ = (sa.Index("ix_queue_audit_project_time", "project", "time", "id"),)


class ReplicaRow(Base):
    """A running server process; its heartbeat tells the others it is alive."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    address: Mapped[str] = mapped_column(sa.String(256))
    start_time: Mapped[datetime]
    heartbeat_time: Mapped[datetime]


class ApiKeyRow(Base):
    """An API key: its secret's SHA-256, never the secret."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    project: Mapped[str] = mapped_column(sa.String(64))
    #: admin | member | viewer
    role: Mapped[str] = mapped_column(sa.String(16))
    secret_hash: Mapped[str] = mapped_column(sa.String(64))
    created_by: Mapped[str] = mapped_column(sa.String(128))
    create_time: Mapped[datetime]
    expire_time: Mapped[datetime | None]
    revoke_time: Mapped[datetime | None]
    last_use_time: Mapped[datetime | None]

    __table_args__ = (sa.Index("ix_api_keys_project_create_time", "project", "create_time", "id"),)
