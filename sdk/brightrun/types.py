"""Typed results: pydantic models for the ``brightrun.v1`` messages.

This is the one module that converts between protos and models, in both
directions, driven by the proto descriptors:

* ``optional`` scalars and unset sub-messages become ``None``;
* ``google.protobuf.Timestamp`` → timezone-aware :class:`~datetime.datetime` (UTC),
  ``Duration`` → :class:`~datetime.timedelta`, ``Struct`` → ``dict``;
* enums → the SDK's :mod:`brightrun.enums` (tolerant of unknown numbers);
* repeated fields → tuples, maps → dicts.

Every model keeps the proto it came from as :attr:`ProtoModel.raw` and can rebuild
one with :meth:`ProtoModel.to_proto`. Models are frozen; a
:class:`~brightrun.Job` changes only through its own ``reload()``/``wait()``.
Sub-messages the server always sets (``Job.config``, ``Job.progress``,
``Job.cost``, ``Dataset.stats``, ...) are never ``None``.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import UnionType
from typing import Any, ClassVar, Generic, Self, TypeVar, Union, cast, get_args, get_origin

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from brightrun.enums import (
    BY_PROTO_NAME,
    CancelReason,
    CostAlert,
    DatasetFormat,
    DatasetState,
    EventType,
    FailureClass,
    FailureOrigin,
    IssueSeverity,
    JobState,
    LrScheduler,
    OomRisk,
    Preset,
    PricingTier,
    PromotionReason,
    ProtoEnum,
    ProvisioningOutcome,
    Quantization,
    RecoveryChoice,
    Role,
    Stage,
    StageStatus,
)
from brightrun.v1 import (
    api_key_service_pb2,
    dataset_pb2,
    job_pb2,
    job_service_pb2,
    project_service_pb2,
    queue_service_pb2,
)

__all__ = [
    "ActiveJob",
    "ActualUsage",
    "ApiKey",
    "BulkCancelResult",
    "Caller",
    "Cancellation",
    "Checkpoint",
    "ComputeConfig",
    "ContextExcerpt",
    "CostEstimate",
    "CostLine",
    "CreatedApiKey",
    "Dataset",
    "DatasetIssue",
    "DatasetStats",
    "DurationEstimate",
    "ExcerptLine",
    "FailureReport",
    "FixConfidence",
    "FixEffect",
    "FixSuggestions",
    "Interruption",
    "JobBase",
    "JobCost",
    "JobEstimate",
    "JobEvent",
    "JobFailure",
    "JobLineage",
    "JobOutput",
    "JobProgress",
    "JobStage",
    "LengthBucket",
    "MemoryComponent",
    "MetricPoint",
    "MonthlySpend",
    "PartialOutputs",
    "PendingDecision",
    "PoolStatus",
    "Promotion",
    "ProtoModel",
    "ProvisioningStatus",
    "QueueAuditEntry",
    "QueueDelay",
    "QueueInfo",
    "QueueSnapshot",
    "QueueStats",
    "QueuedJob",
    "ReadinessCheck",
    "RecoveryAction",
    "RecoveryFix",
    "RecoveryPolicy",
    "RecoveryStatus",
    "SuggestedFix",
    "TrainingConfig",
    "Usage",
    "ValidationSummary",
    "ValueRange",
]

P = TypeVar("P", bound=Message)


class ProtoModel(BaseModel, Generic[P]):
    """Base of every result model: frozen, converts to and from its proto."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_timedelta="float")

    #: The generated message class this model mirrors.
    _proto_type: ClassVar[type[Message]]

    _raw: P | None = PrivateAttr(default=None)

    @classmethod
    def from_proto(cls, message: P) -> Self:
        """The model of `message`; the message stays available as :attr:`raw`."""
        if message.DESCRIPTOR is not cls._proto_type.DESCRIPTOR:
            raise TypeError(f"{cls.__name__}.from_proto expects {cls._proto_type.DESCRIPTOR.full_name}")
        obj = cast(Self, cls.model_construct(**_values_from(cls, message)))
        obj.__pydantic_private__["_raw"] = message  # type: ignore[index]
        return obj

    def _replace_from_proto(self, message: P) -> None:
        """Take every value from `message`, in place (for handles' ``reload()``)."""
        self.__dict__.update(_values_from(type(self), message))
        self.__pydantic_private__["_raw"] = message  # type: ignore[index]

    def to_proto(self) -> P:
        """A new proto holding this model's values."""
        return _to_message(self)  # type: ignore[return-value]

    @property
    def raw(self) -> P:
        """The proto this model was converted from (or :meth:`to_proto` for a
        model built in code). Treat it as read-only."""
        raw = self.__pydantic_private__.get("_raw") if self.__pydantic_private__ else None
        return raw if raw is not None else self.to_proto()

    # Equality and hashing look at the values only, never at `raw` or at a
    # handle's client, so a model built in code equals one from the server.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self).__name__, _hashable(self.__dict__)))


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


# ------------------------------------------------------------------ datasets


class LengthBucket(ProtoModel[dataset_pb2.LengthBucket]):
    """Examples whose length is in [low, high); `high` is None for the last bucket."""

    _proto_type = dataset_pb2.LengthBucket

    low: int = 0
    high: int | None = None
    count: int = 0


class DatasetStats(ProtoModel[dataset_pb2.DatasetStats]):
    """Counts and distributions learned from a dataset file."""

    _proto_type = dataset_pb2.DatasetStats

    conversations: int = 0
    training_pairs: int = 0
    messages: int = 0
    content_chars: int = 0
    length_unit: str = ""
    length_histogram: tuple[LengthBucket, ...] = ()
    personas: dict[str, int] = Field(default_factory=dict)
    emotional_arcs: dict[str, int] = Field(default_factory=dict)
    topics: dict[str, int] = Field(default_factory=dict)
    quality_rating: float | None = None
    total_tokens: int = 0
    max_tokens: int = 0
    conversations_with_errors: int = 0


class ReadinessCheck(ProtoModel[dataset_pb2.ReadinessCheck]):
    """One item of the pre-training checklist; `passed` is None when it could not be checked."""

    _proto_type = dataset_pb2.ReadinessCheck

    name: str = ""
    passed: bool | None = None
    detail: str = ""


class ValidationSummary(ProtoModel[dataset_pb2.ValidationSummary]):
    """The short form of a dataset validation."""

    _proto_type = dataset_pb2.ValidationSummary

    critical_count: int = 0
    warning_count: int = 0
    quality_score: int = 0
    first_errors: tuple[str, ...] = ()
    validate_time: datetime | None = None
    quality_band: str = ""
    ready: bool = False
    readiness: tuple[ReadinessCheck, ...] = ()
    counts_by_type: dict[str, int] = Field(default_factory=dict)
    base_model: str = ""
    max_seq_length: int = 0
    score_bonuses: dict[str, int] = Field(default_factory=dict)


class ExcerptLine(ProtoModel[dataset_pb2.ExcerptLine]):
    """One line of a context excerpt."""

    _proto_type = dataset_pb2.ExcerptLine

    number: int = 0
    text: str = ""
    marked: bool = False
    clipped: bool = False


class ContextExcerpt(ProtoModel[dataset_pb2.ContextExcerpt]):
    """The lines around a problem, the offending one marked."""

    _proto_type = dataset_pb2.ContextExcerpt

    lines: tuple[ExcerptLine, ...] = ()
    caret: int | None = None


class DatasetIssue(ProtoModel[dataset_pb2.ValidationIssue]):
    """One problem found in a stored dataset, pinned to its place
    (``brightrun.v1.ValidationIssue``; named apart from the offline
    :class:`brightrun.validation.ValidationIssue`)."""

    _proto_type = dataset_pb2.ValidationIssue

    type: str = ""
    severity: IssueSeverity = IssueSeverity.UNSPECIFIED
    message: str = ""
    field_path: str = ""
    line: int | None = None
    column: int | None = None
    byte_offset: int | None = None
    conversation_index: int | None = None
    conversation_id: str = ""
    pair_index: int | None = None
    expected: str = ""
    found: str = ""
    suggested_fix: str = ""
    context: ContextExcerpt | None = None


class Dataset(ProtoModel[dataset_pb2.Dataset]):
    """An uploaded training file and what validation learned about it."""

    _proto_type = dataset_pb2.Dataset

    id: str = ""
    name: str = ""
    format: DatasetFormat = DatasetFormat.UNSPECIFIED
    filename: str = ""
    size_bytes: int = 0
    sha256: str = ""
    state: DatasetState = DatasetState.UNSPECIFIED
    create_time: datetime | None = None
    stats: DatasetStats = Field(default_factory=DatasetStats)
    validation: ValidationSummary = Field(default_factory=ValidationSummary)
    request_id: str = ""

    @property
    def is_ready(self) -> bool:
        """True when jobs may use the dataset."""
        return self.state is DatasetState.READY


# ------------------------------------------------------------------ job parts


class TrainingConfig(ProtoModel[job_pb2.TrainingConfig]):
    """LoRA and optimisation hyperparameters.

    On a job every field is set (the effective configuration); as overrides,
    ``None`` / ``UNSPECIFIED`` / ``()`` mean "keep the preset's value".
    """

    _proto_type = job_pb2.TrainingConfig

    lora_rank: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: tuple[str, ...] = ()
    learning_rate: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    warmup_ratio: float | None = None
    max_seq_length: int | None = None
    lr_scheduler: LrScheduler = LrScheduler.UNSPECIFIED
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    seed: int | None = None
    quantization: Quantization = Quantization.UNSPECIFIED
    checkpoint_interval_steps: int | None = None
    validation_split: float | None = None
    gradient_checkpointing: bool | None = None
    max_steps: int | None = None
    eval_interval_steps: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields that are set, as keyword arguments for ``jobs.create``."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None or value == () or (isinstance(value, ProtoEnum) and value == 0):
                continue
            out[name] = value
        return out


class ComputeConfig(ProtoModel[job_pb2.ComputeConfig]):
    """The hardware and pricing a job runs on."""

    _proto_type = job_pb2.ComputeConfig

    gpu_type: str = ""
    pricing_tier: PricingTier = PricingTier.UNSPECIFIED
    max_duration: timedelta | None = None


class JobProgress(ProtoModel[job_pb2.JobProgress]):
    """How far training has come."""

    _proto_type = job_pb2.JobProgress

    current_step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    total_epochs: int = 0
    fraction: float = 0.0
    eta: timedelta | None = None


class JobStage(ProtoModel[job_pb2.JobStage]):
    """One stage of an attempt."""

    _proto_type = job_pb2.JobStage

    stage: Stage = Stage.UNSPECIFIED
    status: StageStatus = StageStatus.UNSPECIFIED
    start_time: datetime | None = None
    end_time: datetime | None = None
    duration: timedelta | None = None
    message: str = ""
    progress: float = 0.0
    attempt: int = 0


class MetricPoint(ProtoModel[job_pb2.MetricPoint]):
    """The training state at one optimiser step; unmeasured values are ``None``."""

    _proto_type = job_pb2.MetricPoint

    sequence: int = 0
    attempt: int = 0
    step: int = 0
    epoch: float = 0.0
    time: datetime | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    steps_per_second: float | None = None
    memory_used_bytes: int | None = None
    memory_peak_bytes: int | None = None
    gpu_utilization: float | None = None
    perplexity: float | None = None


class JobEvent(ProtoModel[job_pb2.JobEvent]):
    """One entry of a job's event log."""

    _proto_type = job_pb2.JobEvent

    sequence: int = 0
    type: EventType = EventType.UNSPECIFIED
    time: datetime | None = None
    code: str = ""
    message: str = ""
    payload: dict[str, Any] = Field(default_factory=dict)
    attempt: int = 0


class Cancellation(ProtoModel[job_pb2.Cancellation]):
    """A recorded cancel request."""

    _proto_type = job_pb2.Cancellation

    reason: CancelReason = CancelReason.UNSPECIFIED
    note: str = ""
    request_time: datetime | None = None


class ValueRange(ProtoModel[job_pb2.ValueRange]):
    """An estimate given as a range, never a point."""

    _proto_type = job_pb2.ValueRange

    low: float = 0.0
    high: float = 0.0

    def __str__(self) -> str:
        return f"{self.low:g} to {self.high:g}"


class JobCost(ProtoModel[job_pb2.JobCost]):
    """What a job has cost so far, in USD, against its estimate."""

    _proto_type = job_pb2.JobCost

    hourly_rate_usd: float = 0.0
    billed_seconds: float = 0.0
    spend_usd: float = 0.0
    projected_usd: float = 0.0
    estimate_usd: ValueRange | None = None
    percent_of_estimate: float = 0.0
    training_usd: float = 0.0
    overhead_usd: float = 0.0
    alert: CostAlert = CostAlert.UNSPECIFIED


class Checkpoint(ProtoModel[job_pb2.Checkpoint]):
    """A complete, checksummed snapshot of training state."""

    _proto_type = job_pb2.Checkpoint

    id: str = ""
    attempt: int = 0
    step: int = 0
    epoch: float = 0.0
    create_time: datetime | None = None
    size_bytes: int = 0
    manifest_sha256: str = ""


class JobFailure(ProtoModel[job_pb2.JobFailure]):
    """Why a job failed."""

    _proto_type = job_pb2.JobFailure

    failure_class: FailureClass = FailureClass.UNSPECIFIED
    reason: str = ""
    message: str = ""
    stage: Stage = Stage.UNSPECIFIED
    step: int = 0
    retryable: bool = False
    exception_type: str = ""
    exit_code: int | None = None
    signal: int | None = None
    log_tail: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()
    origin: FailureOrigin = FailureOrigin.UNSPECIFIED
    recovery: str = ""


class JobOutput(ProtoModel[job_pb2.JobOutput]):
    """What a completed job produced."""

    _proto_type = job_pb2.JobOutput

    artifact_id: str = ""
    adapter_path: str = ""
    final_eval_loss: float | None = None
    final_perplexity: float | None = None
    final_train_loss: float | None = None
    duration: timedelta | None = None


class MemoryComponent(ProtoModel[job_pb2.MemoryComponent]):
    """One line of an estimate's memory breakdown."""

    _proto_type = job_pb2.MemoryComponent

    name: str = ""
    bytes: int = 0
    formula: str = ""
    kind: str = ""


class SuggestedFix(ProtoModel[job_pb2.SuggestedFix]):
    """One way to bring estimated memory under the GPU's capacity."""

    _proto_type = job_pb2.SuggestedFix

    kind: str = ""
    title: str = ""
    config_changes: TrainingConfig = Field(default_factory=TrainingConfig)
    base_model: str = ""
    predicted_total_bytes: int = 0
    predicted_risk: OomRisk = OomRisk.UNSPECIFIED
    saves_bytes: int = 0
    fits: bool = False
    tradeoff: str = ""
    truncated_share: float | None = None


class DurationEstimate(ProtoModel[job_pb2.DurationEstimate]):
    """How long training will take."""

    _proto_type = job_pb2.DurationEstimate

    hours: ValueRange = Field(default_factory=ValueRange)
    train_tokens: ValueRange = Field(default_factory=ValueRange)
    tokens_per_second: ValueRange = Field(default_factory=ValueRange)
    optimizer_steps: int = 0
    reason: str = ""


class CostLine(ProtoModel[job_pb2.CostLine]):
    """One line of a cost estimate."""

    _proto_type = job_pb2.CostLine

    name: str = ""
    usd: ValueRange = Field(default_factory=ValueRange)
    formula: str = ""


class CostEstimate(ProtoModel[job_pb2.CostEstimate]):
    """The cost of a job at one pricing tier."""

    _proto_type = job_pb2.CostEstimate

    pricing_tier: PricingTier = PricingTier.UNSPECIFIED
    usd_per_hour: float = 0.0
    lines: tuple[CostLine, ...] = ()
    total_usd: ValueRange = Field(default_factory=ValueRange)


class JobEstimate(ProtoModel[job_pb2.JobEstimate]):
    """A job's predicted memory, OOM risk, duration and cost."""

    _proto_type = job_pb2.JobEstimate

    model: str = ""
    gpu_type: str = ""
    device: str = ""
    memory: tuple[MemoryComponent, ...] = ()
    trainable_parameters: int = 0
    total_bytes: int = 0
    capacity_bytes: int = 0
    utilization: float = 0.0
    oom_risk: OomRisk = OomRisk.UNSPECIFIED
    shortage_bytes: int = 0
    fixes: tuple[SuggestedFix, ...] = ()
    duration: DurationEstimate | None = None
    cost_spot: CostEstimate | None = None
    cost_on_demand: CostEstimate | None = None
    token_source: str = ""

    @property
    def fits(self) -> bool:
        """True when the estimated peak memory is within the GPU's capacity."""
        return self.shortage_bytes == 0


class RecoveryPolicy(ProtoModel[job_pb2.RecoveryPolicy]):
    """How a job recovers from failures without a user (the server's policy,
    not to be confused with the SDK's own :class:`~brightrun.RetryPolicy` for RPCs)."""

    _proto_type = job_pb2.RecoveryPolicy

    max_system_retries: int | None = None
    initial_backoff: timedelta | None = None
    max_backoff: timedelta | None = None
    on_exhausted: RecoveryChoice = RecoveryChoice.UNSPECIFIED


class RecoveryStatus(ProtoModel[job_pb2.RecoveryStatus]):
    """Where automatic recovery stands."""

    _proto_type = job_pb2.RecoveryStatus

    consecutive_failures: int = 0
    retries_remaining: int = 0
    next_attempt_time: datetime | None = None
    failure_class: FailureClass = FailureClass.UNSPECIFIED
    recovered_count: int = 0


class Interruption(ProtoModel[job_pb2.Interruption]):
    """One attempt ending before the job did, and what it cost."""

    _proto_type = job_pb2.Interruption

    attempt: int = 0
    step: int = 0
    time: datetime | None = None
    downtime: timedelta | None = None
    failure_class: FailureClass = FailureClass.UNSPECIFIED
    reason: str = ""
    resumed_from_step: int = 0
    steps_lost: int = 0
    cost_overhead_usd: float = 0.0
    recovered: bool = False


class JobLineage(ProtoModel[job_pb2.JobLineage]):
    """The retries, continuations and fixes a job descends from."""

    _proto_type = job_pb2.JobLineage

    retry_of: str = ""
    retry_number: int = 0
    root_job_id: str = ""
    resumed_from_job_id: str = ""
    resumed_from_checkpoint_id: str = ""
    applied_fixes: tuple[str, ...] = ()
    chain_spend_usd: float = 0.0


class QueueInfo(ProtoModel[job_pb2.QueueInfo]):
    """Where a queued job stands."""

    _proto_type = job_pb2.QueueInfo

    position: int = 0
    estimated_start_time: datetime | None = None
    confidence: str = ""


class ProvisioningStatus(ProtoModel[job_pb2.ProvisioningStatus]):
    """How getting a worker for the job is going."""

    _proto_type = job_pb2.ProvisioningStatus

    attempt: int = 0
    max_attempts: int = 0
    last_outcome: ProvisioningOutcome = ProvisioningOutcome.UNSPECIFIED
    next_attempt_time: datetime | None = None
    pool: str = ""


class PendingDecision(ProtoModel[job_pb2.PendingDecision]):
    """The choices a job awaiting a decision offers."""

    _proto_type = job_pb2.PendingDecision

    reason: str = ""
    choices: tuple[RecoveryChoice, ...] = ()
    since: datetime | None = None


class JobBase(ProtoModel[job_pb2.Job]):
    """A job's data. :class:`brightrun.Job` and :class:`brightrun.AsyncJob` add
    the methods that talk to the server."""

    _proto_type = job_pb2.Job

    id: str = ""
    name: str = ""
    dataset_id: str = ""
    base_model: str = ""
    preset: Preset = Preset.UNSPECIFIED
    custom: bool = False
    config: TrainingConfig = Field(default_factory=TrainingConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    state: JobState = JobState.UNSPECIFIED
    state_message: str = ""
    create_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    update_time: datetime | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    stages: tuple[JobStage, ...] = ()
    latest_metrics: MetricPoint | None = None
    cost: JobCost = Field(default_factory=JobCost)
    request_id: str = ""
    config_fingerprint: str = ""
    version: int = 0
    cancellation: Cancellation | None = None
    failure: JobFailure | None = None
    output: JobOutput | None = None
    attempt_count: int = 0
    last_metric_sequence: int = 0
    last_event_sequence: int = 0
    latest_checkpoint: Checkpoint | None = None
    checkpoint_count: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    estimate: JobEstimate | None = None
    recovery_policy: RecoveryPolicy | None = None
    recovery: RecoveryStatus | None = None
    interruptions: tuple[Interruption, ...] = ()
    lineage: JobLineage | None = None
    paused_duration: timedelta | None = None
    decision: PendingDecision | None = None
    description: str = ""
    created_by: str = ""
    project: str = ""
    queue: QueueInfo | None = None
    provisioning: ProvisioningStatus | None = None
    warnings: tuple[str, ...] = ()
    promote_time: datetime | None = None

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.id))

    @property
    def is_terminal(self) -> bool:
        """True once the job is COMPLETED, FAILED or CANCELLED."""
        return self.state.is_terminal

    @property
    def elapsed(self) -> timedelta | None:
        """Wall time since the first attempt started (to the end, once terminal)."""
        if self.output is not None and self.output.duration is not None:
            return self.output.duration
        if self.start_time is None:
            return None
        end = self.end_time or datetime.now(UTC)
        return max(timedelta(0), end - self.start_time)

    def stage(self, stage: Stage | str) -> JobStage | None:
        """The current attempt's record of `stage`, or None if it has not started."""
        wanted = Stage.parse(stage)
        found = None
        for entry in self.stages:
            if entry.stage == wanted:
                found = entry
        return found

    @property
    def current_stage(self) -> JobStage | None:
        """The running stage, else the last one recorded."""
        for entry in reversed(self.stages):
            if entry.status is StageStatus.RUNNING:
                return entry
        return self.stages[-1] if self.stages else None


# ------------------------------------------------------------------ recovery actions


class FixEffect(ProtoModel[job_service_pb2.FixEffect]):
    """The expected effect of a suggested fix; unknown values are ``None``."""

    _proto_type = job_service_pb2.FixEffect

    memory_bytes: int | None = None
    memory_bytes_before: int | None = None
    duration_hours: ValueRange | None = None
    cost_usd: ValueRange | None = None
    summary: str = ""


class FixConfidence(ProtoModel[job_service_pb2.FixConfidence]):
    """How often a fix worked before for this kind of failure. With fewer than
    20 recorded outcomes it is :attr:`experimental`: too few to trust the rate."""

    _proto_type = job_service_pb2.FixConfidence

    success_rate: float = 0.0
    outcomes: int = 0
    experimental: bool = False

    def __str__(self) -> str:
        if self.outcomes == 0:
            return "experimental (no outcomes yet)"
        text = f"{self.success_rate:.0%} of {self.outcomes}"
        return f"experimental, {text}" if self.experimental else text


class RecoveryFix(ProtoModel[job_service_pb2.RecoveryFix]):
    """One suggested change for retrying a failed job (``job.suggest_fixes()``),
    ranked by the server; pass it (or its :attr:`id`) to ``job.retry(fixes=...)``."""

    _proto_type = job_service_pb2.RecoveryFix

    id: str = ""
    title: str = ""
    description: str = ""
    config_changes: TrainingConfig = Field(default_factory=TrainingConfig)
    base_model: str = ""
    compute_changes: ComputeConfig = Field(default_factory=ComputeConfig)
    effect: FixEffect = Field(default_factory=FixEffect)
    confidence: FixConfidence = Field(default_factory=FixConfidence)
    incompatible_with: tuple[str, ...] = ()
    #: Whether a retry can apply it (the server says so). Fixes that need a
    #: user's action first (a corrected dataset, another model path) are not
    #: applicable; the server refuses them with ``FIX_NOT_APPLICABLE``.
    applicable: bool = False

    def changes(self) -> dict[str, Any]:
        """Everything the fix changes: training fields by name, ``base_model``,
        and compute fields as ``compute.<field>``."""
        out = self.config_changes.overrides()
        if self.base_model:
            out["base_model"] = self.base_model
        compute = self.compute_changes
        if compute.gpu_type:
            out["compute.gpu_type"] = compute.gpu_type
        if compute.pricing_tier:
            out["compute.pricing_tier"] = compute.pricing_tier
        if compute.max_duration is not None:
            out["compute.max_duration"] = compute.max_duration
        return out


class FixSuggestions(tuple[RecoveryFix, ...]):
    """The ranked fixes for a failed job, best first (a tuple of
    :class:`RecoveryFix`), with the :attr:`failure_class` they address."""

    failure_class: FailureClass

    def __new__(cls, fixes: tuple[RecoveryFix, ...] = (), failure_class: FailureClass | int = 0) -> FixSuggestions:
        obj = super().__new__(cls, fixes)
        obj.failure_class = FailureClass(failure_class)
        return obj

    @classmethod
    def from_proto(cls, message: job_service_pb2.SuggestFixesResponse) -> FixSuggestions:
        return cls(tuple(RecoveryFix.from_proto(f) for f in message.fixes), message.failure_class)

    def get(self, fix_id: str) -> RecoveryFix | None:
        """The fix with this id, or None."""
        return next((f for f in self if f.id == fix_id), None)

    @property
    def applicable(self) -> tuple[RecoveryFix, ...]:
        """The fixes a retry can apply, best first (see :attr:`RecoveryFix.applicable`)."""
        return tuple(f for f in self if f.applicable)

    @property
    def top(self) -> RecoveryFix | None:
        """The best applicable fix, or None when every fix needs a user's action."""
        return next(iter(self.applicable), None)

    def __repr__(self) -> str:
        return f"FixSuggestions({[f.id for f in self]!r}, failure_class={self.failure_class})"


class ActualUsage(ProtoModel[job_service_pb2.ActualUsage]):
    """What a job consumed."""

    _proto_type = job_service_pb2.ActualUsage

    peak_memory_bytes: int | None = None
    billed_seconds: float = 0.0
    spend_usd: float = 0.0
    attempts: int = 0


class PartialOutputs(ProtoModel[job_service_pb2.PartialOutputs]):
    """What a failed job left behind."""

    _proto_type = job_service_pb2.PartialOutputs

    metric_points: int = 0
    events: int = 0
    checkpoints: int = 0
    last_train_loss: float | None = None
    last_eval_loss: float | None = None


class RecoveryAction(ProtoModel[job_service_pb2.RecoveryAction]):
    """Something a user can do about a failure; `rpc` names the call that does it."""

    _proto_type = job_service_pb2.RecoveryAction

    kind: str = ""
    title: str = ""
    description: str = ""
    rpc: str = ""


class FailureReport(ProtoModel[job_service_pb2.FailureReport]):
    """The audit trail of a failed (or cancelled) job: what happened, where,
    what it left behind and what can be done."""

    _proto_type = job_service_pb2.FailureReport

    job_id: str = ""
    failure: JobFailure | None = None
    base_model: str = ""
    last_completed_step: int = 0
    total_steps: int = 0
    checkpoints: tuple[Checkpoint, ...] = ()
    files_written: tuple[str, ...] = ()
    estimate: JobEstimate | None = None
    actual: ActualUsage = Field(default_factory=ActualUsage)
    partial_outputs: PartialOutputs = Field(default_factory=PartialOutputs)
    actions: tuple[RecoveryAction, ...] = ()
    interruptions: tuple[Interruption, ...] = ()


class BulkCancelResult(ProtoModel[job_service_pb2.BulkCancelResult]):
    """What ``jobs.bulk_cancel`` did to one job."""

    _proto_type = job_service_pb2.BulkCancelResult

    job_id: str = ""
    state: JobState = JobState.UNSPECIFIED
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the job is cancelled or cancelling."""
        return not self.error


# ------------------------------------------------------------------ queue and usage


class QueuedJob(ProtoModel[queue_service_pb2.QueuedJob]):
    """A job waiting to start, with its place and expected start."""

    _proto_type = queue_service_pb2.QueuedJob

    job_id: str = ""
    name: str = ""
    position: int = 0
    estimated_start_time: datetime | None = None
    estimated_duration: timedelta | None = None
    confidence: str = ""
    promoted: bool = False
    pool: str = ""
    queued_time: datetime | None = None


class ActiveJob(ProtoModel[queue_service_pb2.ActiveJob]):
    """A job holding a slot."""

    _proto_type = queue_service_pb2.ActiveJob

    job_id: str = ""
    name: str = ""
    state: JobState = JobState.UNSPECIFIED
    pool: str = ""
    progress: float = 0.0
    remaining: timedelta | None = None


class PoolStatus(ProtoModel[queue_service_pb2.PoolStatus]):
    """One compute pool: its slots and, where it has a spot market, availability."""

    _proto_type = queue_service_pb2.PoolStatus

    name: str = ""
    slots: int = 0
    used: int = 0
    spot_availability: float | None = None


class QueueStats(ProtoModel[queue_service_pb2.QueueStats]):
    """Recent queue behaviour."""

    _proto_type = queue_service_pb2.QueueStats

    depth: int = 0
    active: int = 0
    average_wait: timedelta | None = None
    longest_wait: timedelta | None = None
    throughput_per_day: float = 0.0


class QueueSnapshot(ProtoModel[queue_service_pb2.Queue]):
    """The queue at one moment (``brightrun.v1.Queue``): waiting jobs in start
    order, running jobs, pools and statistics. :attr:`version` grows with every
    change on the server that took the snapshot."""

    _proto_type = queue_service_pb2.Queue

    queued: tuple[QueuedJob, ...] = ()
    active: tuple[ActiveJob, ...] = ()
    pools: tuple[PoolStatus, ...] = ()
    stats: QueueStats = Field(default_factory=QueueStats)
    version: int = 0
    time: datetime | None = None

    def position(self, job_id: str) -> QueuedJob | None:
        """The queued entry of `job_id`, or None when it is not waiting."""
        return next((q for q in self.queued if q.job_id == job_id), None)


class QueueDelay(ProtoModel[queue_service_pb2.QueueDelay]):
    """How much later a job starts after a promotion."""

    _proto_type = queue_service_pb2.QueueDelay

    job_id: str = ""
    delay: timedelta | None = None


class QueueAuditEntry(ProtoModel[queue_service_pb2.QueueAuditEntry]):
    """One change to the queue's order: who, when, why."""

    _proto_type = queue_service_pb2.QueueAuditEntry

    id: str = ""
    job_id: str = ""
    action: str = ""
    reason: PromotionReason = PromotionReason.UNSPECIFIED
    justification: str = ""
    actor: str = ""
    time: datetime | None = None
    delayed_job_ids: tuple[str, ...] = ()


class Promotion(ProtoModel[queue_service_pb2.PromoteJobResponse]):
    """What a promotion did: the promoted job (a bound handle when it comes
    from a client), the jobs it delays and the audit entry written."""

    _proto_type = queue_service_pb2.PromoteJobResponse

    job: JobBase = Field(default_factory=JobBase)
    delayed: tuple[QueueDelay, ...] = ()
    audit: QueueAuditEntry | None = None


class MonthlySpend(ProtoModel[project_service_pb2.MonthlySpend]):
    """One calendar month's spend (`month` as ``YYYY-MM``)."""

    _proto_type = project_service_pb2.MonthlySpend

    month: str = ""
    gpu_hours: float = 0.0
    spend_usd: float = 0.0
    jobs: int = 0


class Usage(ProtoModel[project_service_pb2.Usage]):
    """A project's GPU hours against its monthly quota (``None``: unlimited),
    when it resets and would run out, and spend per month, newest first."""

    _proto_type = project_service_pb2.Usage

    project: str = ""
    gpu_hours_used: float = 0.0
    gpu_hours_quota: float | None = None
    gpu_hours_remaining: float | None = None
    reset_time: datetime | None = None
    forecast_exhaustion_time: datetime | None = None
    months: tuple[MonthlySpend, ...] = ()


# ------------------------------------------------------------------ API keys


class ApiKey(ProtoModel[api_key_service_pb2.ApiKey]):
    """An API key of the caller's project; never its secret. `name` is the
    actor recorded on what the key does (``created_by`` of jobs, promotions)."""

    _proto_type = api_key_service_pb2.ApiKey

    id: str = ""
    name: str = ""
    project: str = ""
    role: Role = Role.UNSPECIFIED
    created_by: str = ""
    create_time: datetime | None = None
    expire_time: datetime | None = None
    revoke_time: datetime | None = None
    last_use_time: datetime | None = None

    @property
    def is_revoked(self) -> bool:
        return self.revoke_time is not None

    @property
    def is_expired(self) -> bool:
        """True once its expiry passed (by this machine's clock)."""
        return self.expire_time is not None and self.expire_time <= datetime.now(UTC)

    @property
    def is_active(self) -> bool:
        """Neither revoked nor expired: calls with it are accepted."""
        return not self.is_revoked and not self.is_expired


class CreatedApiKey(ProtoModel[api_key_service_pb2.CreateApiKeyResponse]):
    """A new key and its secret (``client.api_keys.create``). The server keeps
    only a hash: this is the one time the secret is shown, so store it now.
    Neither ``repr()`` nor ``str()`` prints the secret (logs stay clean);
    read it as :attr:`secret`."""

    _proto_type = api_key_service_pb2.CreateApiKeyResponse

    api_key: ApiKey = Field(default_factory=ApiKey)
    #: Send it as ``api_key=`` / ``BRIGHTRUN_API_KEY`` (``brk_<id>_...``).
    secret: str = Field(default="", repr=False)

    @property
    def id(self) -> str:
        """The key's id (so a CreatedApiKey can be passed to ``api_keys.revoke``)."""
        return self.api_key.id


class Caller(ProtoModel[api_key_service_pb2.GetCallerResponse]):
    """Who the client is to the server (``client.whoami()``): the project it
    acts in, its role and the key it calls with."""

    _proto_type = api_key_service_pb2.GetCallerResponse

    project: str = ""
    role: Role = Role.UNSPECIFIED
    api_key: ApiKey = Field(default_factory=ApiKey)


# ------------------------------------------------------------------ conversion


class _Kind(enum.Enum):
    SCALAR = enum.auto()
    OPTIONAL_SCALAR = enum.auto()
    ENUM = enum.auto()
    TIMESTAMP = enum.auto()
    DURATION = enum.auto()
    STRUCT = enum.auto()
    MESSAGE = enum.auto()
    REPEATED_SCALAR = enum.auto()
    REPEATED_ENUM = enum.auto()
    REPEATED_MESSAGE = enum.auto()
    MAP = enum.auto()


@dataclass(frozen=True, slots=True)
class _FieldPlan:
    name: str
    kind: _Kind
    #: The model allows None (unset message → None instead of an empty model).
    nullable: bool
    enum: type[ProtoEnum] | None = None
    model: type[ProtoModel[Any]] | None = None


_WELL_KNOWN = {
    "google.protobuf.Timestamp": _Kind.TIMESTAMP,
    "google.protobuf.Duration": _Kind.DURATION,
    "google.protobuf.Struct": _Kind.STRUCT,
}


def _nullable(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation)


@functools.cache
def _plan(cls: type[ProtoModel[Any]]) -> tuple[_FieldPlan, ...]:
    """How to convert each field of `cls`, from its proto descriptor."""
    if not cls.__pydantic_complete__:
        cls.model_rebuild()  # resolve forward references before reading annotations
    plans = []
    fields = cls.model_fields
    fd: Any
    for fd in cls._proto_type.DESCRIPTOR.fields:
        if fd.name not in fields:
            continue  # a proto field this SDK version does not model
        nullable = _nullable(fields[fd.name].annotation)
        enum_cls = BY_PROTO_NAME[fd.enum_type.full_name] if fd.type == FieldDescriptor.TYPE_ENUM else None
        model = None
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            full = fd.message_type.full_name
            if fd.message_type.GetOptions().map_entry:
                kind = _Kind.MAP
            elif full in _WELL_KNOWN and not fd.is_repeated:
                kind = _WELL_KNOWN[full]
            else:
                model = _MODELS[full]
                kind = _Kind.REPEATED_MESSAGE if fd.is_repeated else _Kind.MESSAGE
        elif enum_cls is not None:
            kind = _Kind.REPEATED_ENUM if fd.is_repeated else _Kind.ENUM
        elif fd.is_repeated:
            kind = _Kind.REPEATED_SCALAR
        else:
            kind = _Kind.OPTIONAL_SCALAR if fd.has_presence else _Kind.SCALAR
        plans.append(_FieldPlan(fd.name, kind, nullable, enum_cls, model))
    return tuple(plans)


def _values_from(cls: type[ProtoModel[Any]], message: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in _plan(cls):
        name, kind = f.name, f.kind
        if kind is _Kind.SCALAR:
            values[name] = getattr(message, name)
        elif kind is _Kind.ENUM:
            values[name] = f.enum(getattr(message, name))  # type: ignore[misc]
        elif kind is _Kind.REPEATED_SCALAR:
            values[name] = tuple(getattr(message, name))
        elif kind is _Kind.MAP:
            values[name] = dict(getattr(message, name))
        elif kind is _Kind.REPEATED_MESSAGE:
            values[name] = tuple(f.model.from_proto(m) for m in getattr(message, name))  # type: ignore[union-attr]
        elif kind is _Kind.REPEATED_ENUM:
            values[name] = tuple(f.enum(v) for v in getattr(message, name))  # type: ignore[misc]
        elif not message.HasField(name) and f.nullable:
            values[name] = None
        elif kind is _Kind.OPTIONAL_SCALAR:
            values[name] = getattr(message, name)
        elif kind is _Kind.TIMESTAMP:
            values[name] = getattr(message, name).ToDatetime(tzinfo=UTC)
        elif kind is _Kind.DURATION:
            values[name] = getattr(message, name).ToTimedelta()
        elif kind is _Kind.STRUCT:
            values[name] = json_format.MessageToDict(getattr(message, name))
        else:
            values[name] = f.model.from_proto(getattr(message, name))  # type: ignore[union-attr]
    return values


def _to_message(model: ProtoModel[Any]) -> Message:
    cls = type(model)
    message = cls._proto_type()
    for f in _plan(cls):
        value = getattr(model, f.name)
        if value is None:
            continue
        kind = f.kind
        if kind in (_Kind.SCALAR, _Kind.OPTIONAL_SCALAR):
            setattr(message, f.name, value)
        elif kind is _Kind.ENUM:
            setattr(message, f.name, int(value))
        elif kind is _Kind.REPEATED_SCALAR:
            getattr(message, f.name).extend(value)
        elif kind is _Kind.REPEATED_ENUM:
            getattr(message, f.name).extend(int(v) for v in value)
        elif kind is _Kind.MAP:
            getattr(message, f.name).update(value)
        elif kind is _Kind.REPEATED_MESSAGE:
            getattr(message, f.name).extend(v.to_proto() for v in value)
        elif kind is _Kind.TIMESTAMP:
            getattr(message, f.name).FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
        elif kind is _Kind.DURATION:
            getattr(message, f.name).FromTimedelta(value)
        elif kind is _Kind.STRUCT:
            target = getattr(message, f.name)
            target.SetInParent()
            target.update(_struct_safe(value))
        else:
            getattr(message, f.name).CopyFrom(value.to_proto())
    return message


def _struct_safe(value: Any) -> Any:
    """A Struct holds JSON values: non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _struct_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_struct_safe(v) for v in value]
    return value


#: Every model by the full name of the message it mirrors.
_MODELS: dict[str, type[ProtoModel[Any]]] = {
    m._proto_type.DESCRIPTOR.full_name: m
    for m in (
        LengthBucket,
        DatasetStats,
        ReadinessCheck,
        ValidationSummary,
        ExcerptLine,
        ContextExcerpt,
        DatasetIssue,
        Dataset,
        TrainingConfig,
        ComputeConfig,
        JobProgress,
        JobStage,
        MetricPoint,
        JobEvent,
        Cancellation,
        JobCost,
        Checkpoint,
        JobFailure,
        JobOutput,
        ValueRange,
        MemoryComponent,
        SuggestedFix,
        DurationEstimate,
        CostLine,
        CostEstimate,
        JobEstimate,
        RecoveryPolicy,
        RecoveryStatus,
        Interruption,
        JobLineage,
        PendingDecision,
        QueueInfo,
        ProvisioningStatus,
        JobBase,
        FixEffect,
        FixConfidence,
        RecoveryFix,
        ActualUsage,
        PartialOutputs,
        RecoveryAction,
        FailureReport,
        BulkCancelResult,
        QueuedJob,
        ActiveJob,
        PoolStatus,
        QueueStats,
        QueueSnapshot,
        QueueDelay,
        QueueAuditEntry,
        Promotion,
        MonthlySpend,
        Usage,
        ApiKey,
        CreatedApiKey,
        Caller,
    )
}

for _model in _MODELS.values():
    _model.model_rebuild()

MODELS: Mapping[str, type[ProtoModel[Any]]] = _MODELS
"""Every result model by the full name of the proto message it mirrors."""
