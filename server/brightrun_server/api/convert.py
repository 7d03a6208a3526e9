"""Translation between protos and the domain / store. No decisions here.

Enums map by name: a proto value `Job.State.STATE_TRAINING` is the domain string
"training" (prefix stripped, lower-cased), so adding a value needs no code here.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from brightrun.v1 import (
    api_key_service_pb2,
    dataset_pb2,
    dataset_service_pb2,
    job_pb2,
    job_service_pb2,
    project_service_pb2,
    queue_service_pb2,
    trainer_service_pb2,
)
from brightrun.validation import ContextExcerpt, DatasetFormat, ValidationIssue
from brightrun.validation.issues import SortKey
from brightrun_server.domain.config import PresetName
from brightrun_server.domain.errors import FieldViolation, InvalidArgument
from brightrun_server.domain.fixes import Fix
from brightrun_server.domain.pricing import PricingTier
from brightrun_server.domain.queueing import Planned
from brightrun_server.domain.recovery import Choice, RecoveryPolicy
from brightrun_server.domain.reports import (
    AttemptOutcome,
    CheckpointInput,
    EventInput,
    MetricValues,
    ProgressUpdate,
    Report,
    ReportBody,
    StageUpdate,
)
from brightrun_server.domain.states import TERMINAL, JobState, StageName
from brightrun_server.services.datasets import UploadMetadata
from brightrun_server.services.jobs import CreateJobInput, EstimateInput, last_step
from brightrun_server.services.queue import Snapshot
from brightrun_server.store.models import (
    ApiKeyRow,
    CheckpointRow,
    DatasetRow,
    EventRow,
    JobRow,
    MetricRow,
    QueueAuditRow,
)

METRIC_FIELDS = (
    "train_loss",
    "eval_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "steps_per_second",
    "memory_used_bytes",
    "memory_peak_bytes",
    "gpu_utilization",
    "perplexity",
)
_INT_METRICS = frozenset({"memory_used_bytes", "memory_peak_bytes"})


# ---------------------------------------------------------------- enums


def enum_name(wrapper: Any, value: int, prefix: str) -> str:
    """Proto enum number → domain string ("" for the zero value or unknown numbers)."""
    if value == 0:
        return ""
    try:
        name = str(wrapper.Name(value))
    except ValueError:
        return ""
    return name.removeprefix(prefix).lower()


@functools.cache
def _enum_numbers(wrapper: Any, prefix: str) -> dict[str, int]:
    """Domain string → number for one enum (a list page converts ~20 enums a job)."""
    return {
        name.removeprefix(prefix).lower(): int(number) for name, number in wrapper.items() if name.startswith(prefix)
    }


def enum_value(wrapper: Any, name: str | None, prefix: str) -> Any:
    """Domain string → proto enum number (0 when empty); typed Any because each
    generated enum has its own NewType for values."""
    if not name:
        return 0
    number = _enum_numbers(wrapper, prefix).get(name.lower())
    if number is None:  # raises ValueError naming the unknown value
        return int(wrapper.Value(prefix + name.upper()))
    return number


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """An aware datetime as a Timestamp (what Timestamp.FromDatetime computes, in
    a fraction of its time: list pages convert ~10 a job)."""
    if value is None:
        return None
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


def _ts_str(value: str | None) -> timestamp_pb2.Timestamp | None:
    return _ts(datetime.fromisoformat(value)) if value else None


#: The ranges google.protobuf.Timestamp and Duration define (0001-01-01 to
#: 9999-12-31; +-10,000 years); outside them the conversions overflow.
_TS_MIN, _TS_MAX = -62_135_596_800, 253_402_300_799
_DUR_MAX = 315_576_000_000


def timedelta_of(value: duration_pb2.Duration, field: str) -> timedelta:
    """A request's Duration as a timedelta; INVALID_ARGUMENT naming `field` if it
    is not a valid Duration."""
    seconds, nanos = value.seconds, value.nanos
    if not (-_DUR_MAX <= seconds <= _DUR_MAX and -999_999_999 <= nanos <= 999_999_999) or seconds * nanos < 0:
        raise InvalidArgument(
            [FieldViolation(field, "is not a valid Duration (at most 10,000 years; nanos of the seconds' sign)")]
        )
    return value.ToTimedelta()


def datetime_of(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A request's Timestamp as an aware datetime; INVALID_ARGUMENT naming
    `field` if it is not a valid Timestamp."""
    if not (_TS_MIN <= value.seconds <= _TS_MAX and 0 <= value.nanos <= 999_999_999):
        raise InvalidArgument([FieldViolation(field, "is not a valid Timestamp (years 1 to 9999, nanos 0 to 1e9-1)")])
    return value.ToDatetime(tzinfo=UTC)


def _dur(seconds: float) -> duration_pb2.Duration:
    """Seconds (negative counts as 0) as a Duration at microsecond precision, as
    Duration.FromTimedelta(timedelta(seconds=...)) gives, without the detour."""
    micros = round(max(0.0, seconds) * 1_000_000)
    return duration_pb2.Duration(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


# ---------------------------------------------------------------- datasets


def dataset(row: DatasetRow) -> dataset_pb2.Dataset:
    v = row.validation
    summary = dataset_pb2.ValidationSummary(
        critical_count=int(v.get("critical_count", 0)),
        warning_count=int(v.get("warning_count", 0)),
        quality_score=int(v.get("quality_score", 0)),
        first_errors=list(v.get("first_errors", [])),
        quality_band=str(v.get("quality_band", "")),
        ready=bool(v.get("ready", False)),
        readiness=[_readiness(c) for c in v.get("readiness", [])],
        counts_by_type={str(k): int(n) for k, n in v.get("counts_by_type", {}).items()},
        base_model=str(v.get("base_model", "")),
        max_seq_length=int(v.get("max_seq_length", 0)),
        score_bonuses={str(k): int(n) for k, n in v.get("score_bonuses", {}).items()},
    )
    validated = _ts_str(v.get("validate_time"))
    if validated is not None:
        summary.validate_time.CopyFrom(validated)
    s = row.stats
    stats = dataset_pb2.DatasetStats(
        conversations=int(s.get("conversations", 0)),
        training_pairs=int(s.get("training_pairs", 0)),
        messages=int(s.get("messages", 0)),
        content_chars=int(s.get("content_chars", 0)),
        length_unit=str(s.get("length_unit", "")),
        length_histogram=[_bucket(b) for b in s.get("length_histogram", [])],
        personas={str(k): int(n) for k, n in s.get("personas", {}).items()},
        emotional_arcs={str(k): int(n) for k, n in s.get("emotional_arcs", {}).items()},
        topics={str(k): int(n) for k, n in s.get("topics", {}).items()},
        total_tokens=int(s.get("total_tokens", 0)),
        max_tokens=int(s.get("max_tokens", 0)),
        conversations_with_errors=int(s.get("conversations_with_errors", 0)),
    )
    if s.get("quality_rating") is not None:
        stats.quality_rating = float(s["quality_rating"])
    return dataset_pb2.Dataset(
        id=row.id,
        name=row.name,
        format=enum_value(dataset_pb2.DatasetFormat, row.format, "DATASET_FORMAT_"),
        filename=row.filename,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        state=enum_value(dataset_pb2.Dataset.State, row.state, "STATE_"),
        create_time=_ts(row.create_time),
        stats=stats,
        validation=summary,
        request_id=row.request_id or "",
    )


def _readiness(check: Mapping[str, Any]) -> dataset_pb2.ReadinessCheck:
    out = dataset_pb2.ReadinessCheck(name=str(check["name"]), detail=str(check.get("detail", "")))
    if check.get("passed") is not None:
        out.passed = bool(check["passed"])
    return out


def _bucket(bucket: Mapping[str, Any]) -> dataset_pb2.LengthBucket:
    out = dataset_pb2.LengthBucket(low=int(bucket["low"]), count=int(bucket["count"]))
    if bucket.get("high") is not None:
        out.high = int(bucket["high"])
    return out


_ISSUE_ORDERS: dict[int, SortKey] = {
    dataset_service_pb2.ISSUE_ORDER_UNSPECIFIED: "index",
    dataset_service_pb2.ISSUE_ORDER_INDEX: "index",
    dataset_service_pb2.ISSUE_ORDER_TYPE: "type",
    dataset_service_pb2.ISSUE_ORDER_SEVERITY: "severity",
}


def issue_order(value: int) -> SortKey:
    if value not in _ISSUE_ORDERS:
        raise InvalidArgument([FieldViolation("order_by", "must be INDEX, TYPE or SEVERITY")])
    return _ISSUE_ORDERS[value]


def validation_issue(issue: ValidationIssue, excerpt: ContextExcerpt | None) -> dataset_pb2.ValidationIssue:
    out = dataset_pb2.ValidationIssue(
        type=issue.type,
        severity=enum_value(dataset_pb2.ValidationIssue.Severity, issue.severity, "SEVERITY_"),
        message=issue.message,
        field_path=issue.path,
        conversation_id=str(issue.conversation_id or ""),
        expected=str(issue.expected or ""),
        found=str(issue.found or ""),
        suggested_fix=str(issue.suggested_fix or ""),
    )
    for name in ("line", "column", "byte_offset", "conversation_index", "pair_index"):
        value = getattr(issue, name)
        if value is not None:
            setattr(out, name, int(value))
    if excerpt is not None:
        out.context.lines.extend(
            dataset_pb2.ExcerptLine(number=x.number, text=x.text, marked=x.marked, clipped=x.clipped)
            for x in excerpt.lines
        )
        if excerpt.caret is not None:
            out.context.caret = excerpt.caret
    return out


def upload_metadata(meta: dataset_service_pb2.UploadDatasetMetadata) -> UploadMetadata:
    fmt = enum_name(dataset_pb2.DatasetFormat, meta.format, "DATASET_FORMAT_")
    return UploadMetadata(
        name=meta.name,
        filename=meta.filename,
        format=DatasetFormat(fmt) if fmt else None,
        size_bytes=meta.size_bytes,
        sha256=meta.sha256,
        request_id=meta.request_id,
    )


# ---------------------------------------------------------------- jobs


def overrides(o: job_pb2.TrainingConfig, prefix: str = "overrides") -> dict[str, Any]:
    """The fields set in a TrainingConfig, by TrainingParams name."""
    out: dict[str, Any] = {}
    for fd in o.DESCRIPTOR.fields:
        name = fd.name
        if name == "target_modules":
            if o.target_modules:
                out[name] = list(o.target_modules)
        elif name == "lr_scheduler":
            if o.lr_scheduler:
                out[name] = _checked_enum(job_pb2.LrScheduler, o.lr_scheduler, "LR_SCHEDULER_", f"{prefix}.{name}")
        elif name == "quantization":
            if o.quantization:
                out[name] = _checked_enum(job_pb2.Quantization, o.quantization, "QUANTIZATION_", f"{prefix}.{name}")
        elif o.HasField(name):  # type: ignore[arg-type]
            out[name] = getattr(o, name)
    return out


def create_input(req: job_service_pb2.CreateJobRequest) -> CreateJobInput:
    preset = _checked_enum(job_pb2.Preset, req.preset, "PRESET_", "preset") if req.preset else ""
    tier = (
        _checked_enum(job_pb2.PricingTier, req.compute.pricing_tier, "PRICING_TIER_", "compute.pricing_tier")
        if req.compute.pricing_tier
        else ""
    )
    duration = (
        timedelta_of(req.compute.max_duration, "compute.max_duration") if req.compute.HasField("max_duration") else None
    )
    return CreateJobInput(
        request_id=req.request_id,
        name=req.name,
        dataset_id=req.dataset_id,
        base_model=req.base_model,
        preset=PresetName(preset) if preset else None,
        overrides=overrides(req.overrides),
        gpu_type=req.compute.gpu_type,
        pricing_tier=PricingTier(tier) if tier else None,
        max_duration=duration,
        labels=dict(req.labels),
        acknowledge_oom_risk=req.acknowledge_oom_risk,
        recovery=recovery_keywords(req.recovery_policy) if req.HasField("recovery_policy") else {},
        force=req.force,
        description=req.description,
    )


def recovery_keywords(policy: job_pb2.RecoveryPolicy) -> dict[str, Any]:
    """Set fields of a RecoveryPolicy as recovery.resolve_policy keywords."""
    out: dict[str, Any] = {}
    if policy.HasField("max_system_retries"):
        out["max_system_retries"] = policy.max_system_retries
    if policy.HasField("initial_backoff"):
        out["initial_backoff_seconds"] = timedelta_of(
            policy.initial_backoff, "recovery_policy.initial_backoff"
        ).total_seconds()
    if policy.HasField("max_backoff"):
        out["max_backoff_seconds"] = timedelta_of(policy.max_backoff, "recovery_policy.max_backoff").total_seconds()
    if policy.on_exhausted:
        out["on_exhausted"] = Choice(
            _checked_enum(
                job_pb2.RecoveryChoice, policy.on_exhausted, "RECOVERY_CHOICE_", "recovery_policy.on_exhausted"
            )
        )
    return out


def estimate_input(req: job_service_pb2.EstimateJobRequest) -> EstimateInput:
    created = create_input(
        job_service_pb2.CreateJobRequest(
            dataset_id=req.dataset_id,
            base_model=req.base_model,
            preset=req.preset,
            overrides=req.overrides,
            compute=req.compute,
        )
    )
    return EstimateInput(
        dataset_id=created.dataset_id,
        base_model=created.base_model,
        preset=created.preset,
        overrides=created.overrides,
        gpu_type=created.gpu_type,
        pricing_tier=created.pricing_tier,
    )


def _range(values: Any) -> job_pb2.ValueRange:
    low, high = values
    return job_pb2.ValueRange(low=float(low), high=float(high))


def _risk(name: str | None) -> Any:
    return enum_value(job_pb2.OomRisk, name, "OOM_RISK_")


def _cost_estimate(doc: Mapping[str, Any] | None) -> job_pb2.CostEstimate | None:
    if not doc:
        return None
    return job_pb2.CostEstimate(
        pricing_tier=enum_value(job_pb2.PricingTier, doc["pricing_tier"], "PRICING_TIER_"),
        usd_per_hour=doc["usd_per_hour"],
        lines=[job_pb2.CostLine(name=x["name"], usd=_range(x["usd"]), formula=x["formula"]) for x in doc["lines"]],
        total_usd=_range(doc["total_usd"]),
    )


def estimate(doc: Mapping[str, Any]) -> job_pb2.JobEstimate:
    out = job_pb2.JobEstimate(
        model=doc["model"],
        gpu_type=doc["gpu_type"],
        device=doc["device"],
        memory=[job_pb2.MemoryComponent(**m) for m in doc["memory"]],
        trainable_parameters=doc["trainable_parameters"],
        total_bytes=doc["total_bytes"],
        capacity_bytes=doc["capacity_bytes"],
        utilization=doc["utilization"],
        oom_risk=_risk(doc["oom_risk"]),
        shortage_bytes=doc["shortage_bytes"],
        token_source=doc.get("token_source", ""),
    )
    for f in doc["fixes"]:
        fix = job_pb2.SuggestedFix(
            kind=f["kind"],
            title=f["title"],
            config_changes=training_config(f["config_changes"]),
            base_model=f["base_model"],
            predicted_total_bytes=f["predicted_total_bytes"],
            predicted_risk=_risk(f["predicted_risk"]),
            saves_bytes=f["saves_bytes"],
            fits=f["fits"],
            tradeoff=f["tradeoff"],
        )
        if f.get("truncated_share") is not None:
            fix.truncated_share = f["truncated_share"]
        out.fixes.append(fix)
    d = doc.get("duration")
    if d:
        out.duration.CopyFrom(
            job_pb2.DurationEstimate(
                hours=_range(d["hours"]),
                train_tokens=_range(d["train_tokens"]),
                tokens_per_second=_range(d["tokens_per_second"]),
                optimizer_steps=d["optimizer_steps"],
                reason=d["reason"],
            )
        )
    for field, key in (("cost_spot", "cost_spot"), ("cost_on_demand", "cost_on_demand")):
        cost = _cost_estimate(doc.get(key))
        if cost is not None:
            getattr(out, field).CopyFrom(cost)
    return out


def _checked_enum(wrapper: Any, value: int, prefix: str, field: str) -> str:
    name = enum_name(wrapper, value, prefix)
    if not name:
        allowed = ", ".join(n for n in wrapper.DESCRIPTOR.values_by_name if not n.endswith("UNSPECIFIED"))
        raise InvalidArgument([FieldViolation(field, f"unknown value {value}; one of {allowed}")])
    return name


def training_config(params: Mapping[str, Any]) -> job_pb2.TrainingConfig:
    out = job_pb2.TrainingConfig()
    for key, value in params.items():
        if key == "target_modules":
            out.target_modules.extend(value)
        elif key == "lr_scheduler":
            out.lr_scheduler = enum_value(job_pb2.LrScheduler, value, "LR_SCHEDULER_")
        elif key == "quantization":
            out.quantization = enum_value(job_pb2.Quantization, value, "QUANTIZATION_")
        else:
            setattr(out, key, value)
    return out


def stage(entry: Mapping[str, Any], now: datetime) -> job_pb2.JobStage:
    start = datetime.fromisoformat(entry["start_time"]) if entry.get("start_time") else None
    end = datetime.fromisoformat(entry["end_time"]) if entry.get("end_time") else None
    out = job_pb2.JobStage(
        stage=enum_value(job_pb2.Stage, entry["stage"], "STAGE_"),
        status=enum_value(job_pb2.JobStage.Status, entry["status"], "STATUS_"),
        message=entry.get("message", ""),
        progress=float(entry.get("progress", 0.0)),
        attempt=int(entry.get("attempt", 0)),
        start_time=_ts(start),
        end_time=_ts(end),
    )
    if start is not None:
        out.duration.CopyFrom(_dur(((end or now) - start).total_seconds()))
    return out


def metric_values(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in METRIC_FIELDS if values.get(k) is not None}


def job(
    row: JobRow, now: datetime | None = None, *, chain_spend: float | None = None, queue: Planned | None = None
) -> job_pb2.Job:
    now = now or datetime.now(UTC)
    state = JobState(row.state)
    out = job_pb2.Job(
        id=row.id,
        name=row.name,
        dataset_id=row.dataset_id,
        base_model=row.base_model,
        preset=enum_value(job_pb2.Preset, row.preset, "PRESET_"),
        custom=row.custom,
        config=training_config(row.params),
        compute=job_pb2.ComputeConfig(
            gpu_type=row.compute["gpu_type"],
            pricing_tier=enum_value(job_pb2.PricingTier, row.compute["pricing_tier"], "PRICING_TIER_"),
            max_duration=_dur(float(row.compute["max_duration_seconds"])),
        ),
        state=enum_value(job_pb2.Job.State, state.value, "STATE_"),
        state_message=row.state_message,
        create_time=_ts(row.create_time),
        update_time=_ts(row.update_time),
        start_time=_ts(row.start_time),
        end_time=_ts(row.end_time),
        request_id=row.request_id or "",
        config_fingerprint=row.fingerprint,
        version=row.version,
        attempt_count=row.attempt_count,
        last_metric_sequence=row.last_metric_seq,
        last_event_sequence=row.last_event_seq,
        checkpoint_count=row.checkpoint_count,
        labels=row.labels,
    )
    fraction = row.current_step / row.total_steps if row.total_steps else 0.0
    out.progress.CopyFrom(
        job_pb2.JobProgress(
            current_step=row.current_step,
            total_steps=row.total_steps,
            epoch=row.epoch,
            total_epochs=row.total_epochs,
            fraction=min(1.0, fraction),
        )
    )
    latest = row.latest_metrics or {}
    sps = latest.get("steps_per_second")
    if state is JobState.TRAINING and isinstance(sps, int | float) and sps > 0 and row.total_steps:
        out.progress.eta.CopyFrom(_dur((row.total_steps - row.current_step) / sps))
    out.stages.extend(stage(s, now) for s in row.stages)
    if latest:
        out.latest_metrics.CopyFrom(
            job_pb2.MetricPoint(
                sequence=int(latest.get("seq", 0)),
                attempt=int(latest.get("attempt", 0)),
                step=int(latest.get("step", 0)),
                epoch=float(latest.get("epoch", 0.0)),
                time=_ts_str(latest.get("time")),
                **metric_values(latest),
            )
        )
    billed = row.billed_seconds + ((now - row.billing_since).total_seconds() if row.billing_since is not None else 0.0)
    spend = billed / 3600 * row.hourly_rate_usd
    projected = spend
    if state not in TERMINAL and 0.02 < fraction < 1.0:
        projected = spend / fraction
    out.cost.CopyFrom(cost(row, billed, spend, projected))
    out.description = row.description
    out.created_by = row.created_by
    out.project = row.project
    out.warnings.extend(row.warnings)
    promoted = _ts(row.promote_time)
    if promoted is not None:
        out.promote_time.CopyFrom(promoted)
    if row.provisioning:
        out.provisioning.CopyFrom(provisioning(row.provisioning, row.pool))
    if queue is not None:
        out.queue.CopyFrom(
            job_pb2.QueueInfo(
                position=queue.position, estimated_start_time=_ts(queue.start), confidence=queue.confidence
            )
        )
    if row.cancel_reason:
        out.cancellation.CopyFrom(
            job_pb2.Cancellation(
                reason=enum_value(job_pb2.CancelReason, row.cancel_reason, "CANCEL_REASON_"),
                note=row.cancel_note or "",
                request_time=_ts(row.cancel_time),
            )
        )
    if row.failure:
        out.failure.CopyFrom(failure(row.failure))
    if row.output:
        o = row.output
        out.output.CopyFrom(
            job_pb2.JobOutput(
                artifact_id=o["artifact_id"],
                adapter_path=o["adapter_path"],
                duration=_dur(float(o.get("duration_seconds", 0.0))),
                **{
                    k: o[k] for k in ("final_eval_loss", "final_perplexity", "final_train_loss") if o.get(k) is not None
                },
            )
        )
    if row.estimate:
        out.estimate.CopyFrom(estimate(row.estimate))
    _recovery_fields(out, row, now, spend if chain_spend is None else chain_spend)
    if row.latest_checkpoint:
        c = row.latest_checkpoint
        out.latest_checkpoint.CopyFrom(
            job_pb2.Checkpoint(
                id=c["id"],
                attempt=c["attempt"],
                step=c["step"],
                epoch=c["epoch"],
                create_time=_ts_str(c["create_time"]),
                size_bytes=c["size_bytes"],
                manifest_sha256=c["manifest_sha256"],
            )
        )
    return out


def cost(row: JobRow, billed: float, spend: float, projected: float) -> job_pb2.JobCost:
    """Spend so far against the estimate, split into training and interruption overhead."""
    overhead = sum(float(i.get("cost_overhead_usd") or 0.0) for i in row.interruptions)
    out = job_pb2.JobCost(
        hourly_rate_usd=row.hourly_rate_usd,
        billed_seconds=billed,
        spend_usd=spend,
        projected_usd=projected,
        overhead_usd=min(overhead, spend),
        training_usd=max(0.0, spend - overhead),
        alert=enum_value(job_pb2.CostAlert, row.cost_alert, "COST_ALERT_"),
    )
    tier_cost = (row.estimate or {}).get("cost_spot" if row.compute["pricing_tier"] == "spot" else "cost_on_demand")
    if tier_cost:
        low, high = tier_cost["total_usd"]
        out.estimate_usd.CopyFrom(job_pb2.ValueRange(low=low, high=high))
        out.percent_of_estimate = 100.0 * spend / high if high else 0.0
    return out


def provisioning(doc: Mapping[str, Any], pool: str) -> job_pb2.ProvisioningStatus:
    out = job_pb2.ProvisioningStatus(
        attempt=int(doc.get("attempt", 0)),
        max_attempts=int(doc.get("max_attempts", 0)),
        last_outcome=enum_value(job_pb2.ProvisioningOutcome, doc.get("last_outcome"), "PROVISIONING_OUTCOME_"),
        pool=pool,
    )
    next_time = _ts_str(doc.get("next_attempt_time"))
    if next_time is not None:
        out.next_attempt_time.CopyFrom(next_time)
    return out


def _recovery_fields(out: job_pb2.Job, row: JobRow, now: datetime, chain_spend: float) -> None:
    policy = RecoveryPolicy.from_dict(row.recovery_policy)
    out.recovery_policy.CopyFrom(
        job_pb2.RecoveryPolicy(
            max_system_retries=policy.max_system_retries,
            initial_backoff=_dur(policy.initial_backoff_seconds),
            max_backoff=_dur(policy.max_backoff_seconds),
            on_exhausted=enum_value(job_pb2.RecoveryChoice, policy.on_exhausted.value, "RECOVERY_CHOICE_"),
        )
    )
    status = job_pb2.RecoveryStatus(
        consecutive_failures=row.consecutive_failures,
        retries_remaining=max(0, policy.max_system_retries - row.consecutive_failures),
        failure_class=enum_value(job_pb2.FailureClass, row.recovering_class, "FAILURE_CLASS_"),
        recovered_count=row.recovered_count,
    )
    next_time = _ts(row.next_attempt_time)
    if next_time is not None:
        status.next_attempt_time.CopyFrom(next_time)
    out.recovery.CopyFrom(status)
    for entry in row.interruptions:
        item = job_pb2.Interruption(
            attempt=int(entry["attempt"]),
            step=int(entry["step"]),
            time=_ts_str(entry["time"]),
            failure_class=enum_value(job_pb2.FailureClass, entry["failure_class"], "FAILURE_CLASS_"),
            reason=entry["reason"],
            resumed_from_step=int(entry.get("resumed_from_step") or 0),
            steps_lost=int(entry.get("steps_lost") or 0),
            cost_overhead_usd=float(entry.get("cost_overhead_usd") or 0.0),
            recovered=bool(entry.get("recovered")),
        )
        if entry.get("downtime_seconds") is not None:
            item.downtime.CopyFrom(_dur(float(entry["downtime_seconds"])))
        out.interruptions.append(item)
    out.lineage.CopyFrom(
        job_pb2.JobLineage(
            retry_of=row.retry_of or "",
            retry_number=row.retry_number,
            root_job_id=row.root_job_id,
            resumed_from_job_id=row.resumed_from_job_id or "",
            resumed_from_checkpoint_id=row.resumed_from_checkpoint_id or "",
            applied_fixes=list(row.applied_fixes),
            chain_spend_usd=chain_spend,
        )
    )
    paused = row.paused_seconds + ((now - row.paused_since).total_seconds() if row.paused_since else 0.0)
    out.paused_duration.CopyFrom(_dur(paused))
    if row.decision:
        out.decision.CopyFrom(
            job_pb2.PendingDecision(
                reason=row.decision["reason"],
                choices=[enum_value(job_pb2.RecoveryChoice, c, "RECOVERY_CHOICE_") for c in row.decision["choices"]],
                since=_ts_str(row.decision["since"]),
            )
        )


def checkpoint(row: CheckpointRow) -> job_pb2.Checkpoint:
    return job_pb2.Checkpoint(
        id=row.id,
        attempt=row.attempt,
        step=row.step,
        epoch=row.epoch,
        create_time=_ts(row.create_time),
        size_bytes=row.size_bytes,
        manifest_sha256=row.manifest_sha256,
    )


def recovery_fix(fix: Fix) -> job_service_pb2.RecoveryFix:
    effect = job_service_pb2.FixEffect(summary=fix.summary)
    if fix.effect.memory_bytes is not None:
        effect.memory_bytes = fix.effect.memory_bytes
    if fix.effect.memory_bytes_before is not None:
        effect.memory_bytes_before = fix.effect.memory_bytes_before
    if fix.effect.duration_hours is not None:
        effect.duration_hours.CopyFrom(_range(fix.effect.duration_hours))
    if fix.effect.cost_usd is not None:
        effect.cost_usd.CopyFrom(_range(fix.effect.cost_usd))
    compute = job_pb2.ComputeConfig()
    if "pricing_tier" in fix.compute_changes:
        compute.pricing_tier = enum_value(job_pb2.PricingTier, fix.compute_changes["pricing_tier"], "PRICING_TIER_")
    if "max_duration_seconds" in fix.compute_changes:
        compute.max_duration.CopyFrom(_dur(float(fix.compute_changes["max_duration_seconds"])))
    return job_service_pb2.RecoveryFix(
        id=fix.id,
        title=fix.title,
        description=fix.description,
        config_changes=training_config(fix.config_changes),
        base_model=fix.base_model,
        compute_changes=compute,
        effect=effect,
        confidence=job_service_pb2.FixConfidence(
            success_rate=fix.success_rate, outcomes=fix.outcomes, experimental=fix.experimental
        ),
        incompatible_with=list(fix.incompatible_with),
        applicable=fix.applicable,
    )


def failure_report(report: Mapping[str, Any]) -> job_service_pb2.FailureReport:
    row: JobRow = report["job"]
    actual = report["actual"]
    partial = report["partial"]
    out = job_service_pb2.FailureReport(
        job_id=row.id,
        failure=failure(report["failure"]),
        base_model=row.base_model,
        last_completed_step=last_step(row),
        total_steps=row.total_steps,
        checkpoints=[checkpoint(c) for c in report["checkpoints"]],
        files_written=list(report["files_written"]),
        actual=job_service_pb2.ActualUsage(
            billed_seconds=actual["billed_seconds"], spend_usd=actual["spend_usd"], attempts=actual["attempts"]
        ),
        partial_outputs=job_service_pb2.PartialOutputs(
            metric_points=partial["metric_points"], events=partial["events"], checkpoints=partial["checkpoints"]
        ),
        actions=[job_service_pb2.RecoveryAction(**a) for a in report["actions"]],
    )
    if actual.get("peak_memory_bytes") is not None:
        out.actual.peak_memory_bytes = int(actual["peak_memory_bytes"])
    for key in ("last_train_loss", "last_eval_loss"):
        if partial.get(key) is not None:
            setattr(out.partial_outputs, key, float(partial[key]))
    if row.estimate:
        out.estimate.CopyFrom(estimate(row.estimate))
    job_view = job(row)
    out.interruptions.extend(job_view.interruptions)
    return out


def failure(doc: Mapping[str, Any]) -> job_pb2.JobFailure:
    out = job_pb2.JobFailure(
        failure_class=enum_value(job_pb2.FailureClass, doc.get("failure_class"), "FAILURE_CLASS_"),
        reason=str(doc.get("reason", "")),
        message=str(doc.get("message", "")),
        stage=enum_value(job_pb2.Stage, doc.get("stage"), "STAGE_"),
        step=int(doc.get("step") or 0),
        retryable=bool(doc.get("retryable", False)),
        exception_type=str(doc.get("exception_type", "")),
        log_tail=[str(line) for line in doc.get("log_tail", [])],
        evidence=[str(line) for line in doc.get("evidence", [])],
        origin=enum_value(job_pb2.FailureOrigin, doc.get("origin"), "FAILURE_ORIGIN_"),
        recovery=str(doc.get("recovery", "")),
    )
    if doc.get("exit_code") is not None:
        out.exit_code = int(doc["exit_code"])
    if doc.get("signal") is not None:
        out.signal = int(doc["signal"])
    return out


def failure_doc(message: job_pb2.JobFailure) -> dict[str, Any]:
    """A trainer's JobFailure → the dict the job service classifies."""
    return {
        "failure_class": enum_name(job_pb2.FailureClass, message.failure_class, "FAILURE_CLASS_"),
        "message": message.message,
        "stage": enum_name(job_pb2.Stage, message.stage, "STAGE_"),
        "step": message.step,
        "exception_type": message.exception_type,
        "log_tail": list(message.log_tail),
        "exit_code": message.exit_code if message.HasField("exit_code") else None,
        "signal": message.signal if message.HasField("signal") else None,
    }


def metric(row: MetricRow) -> job_pb2.MetricPoint:
    out = job_pb2.MetricPoint(sequence=row.seq, attempt=row.attempt, step=row.step, epoch=row.epoch, time=_ts(row.time))
    for name in METRIC_FIELDS:
        value = getattr(row, name)
        if value is not None:
            setattr(out, name, value)
    return out


def event(row: EventRow) -> job_pb2.JobEvent:
    payload = struct_pb2.Struct()
    payload.update(_jsonable(row.payload))
    return job_pb2.JobEvent(
        sequence=row.seq,
        type=enum_value(job_pb2.JobEvent.Type, row.type, "TYPE_"),
        time=_ts(row.time),
        code=row.code,
        message=row.message,
        payload=payload,
        attempt=row.attempt,
    )


def _jsonable(value: Mapping[str, Any]) -> dict[str, Any]:
    """Struct holds JSON values only; non-finite floats become strings."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [fix(x) for x in v]
        return v

    return fix(dict(value))  # type: ignore[no-any-return]


def event_types(values: Any) -> list[str]:
    names = [enum_name(job_pb2.JobEvent.Type, int(v), "TYPE_") for v in values]
    return [n for n in names if n]


# ---------------------------------------------------------------- trainer reports

_STAGE_STATUS = {
    job_pb2.JobStage.STATUS_RUNNING: "running",
    job_pb2.JobStage.STATUS_SUCCEEDED: "succeeded",
}
_OUTCOMES = {
    trainer_service_pb2.AttemptResult.OUTCOME_SUCCEEDED: "succeeded",
    trainer_service_pb2.AttemptResult.OUTCOME_FAILED: "failed",
    trainer_service_pb2.AttemptResult.OUTCOME_STOPPED: "stopped",
}


def report(message: trainer_service_pb2.AttemptReport, field: str = "reports") -> Report:
    """A trainer's report; `field` is its path in the request, for errors."""
    when = datetime_of(message.time, f"{field}.time") if message.HasField("time") else datetime.now(UTC)
    kind = message.WhichOneof("report")
    body: ReportBody | None = None
    if kind == "metric":
        m = message.metric
        values = {name: getattr(m, name) for name in METRIC_FIELDS if m.HasField(name)}  # type: ignore[arg-type]
        values = {k: (int(v) if k in _INT_METRICS else _finite_or_none(v)) for k, v in values.items()}
        body = MetricValues(step=m.step, epoch=m.epoch, values={k: v for k, v in values.items() if v is not None})
    elif kind == "progress":
        p = message.progress
        body = ProgressUpdate(p.current_step, p.total_steps, p.epoch, p.total_epochs)
    elif kind == "stage":
        s = message.stage
        name = enum_name(job_pb2.Stage, s.stage, "STAGE_")
        status = _STAGE_STATUS.get(s.status)
        if name and status:
            body = StageUpdate(StageName(name), status, s.message, s.progress)
    elif kind == "event":
        e = message.event
        body = EventInput(
            type=enum_name(job_pb2.JobEvent.Type, e.type, "TYPE_") or "info",
            code=e.code or "TRAINER_EVENT",
            message=e.message,
            payload=json_format.MessageToDict(e.payload) if e.HasField("payload") else {},
        )
    elif kind == "checkpoint":
        c = message.checkpoint
        body = CheckpointInput(c.step, c.epoch, c.path, c.size_bytes, c.manifest_sha256)
    elif kind == "result":
        r = message.result
        body = AttemptOutcome(
            outcome=_OUTCOMES.get(r.outcome, "failed"),
            adapter_path=r.adapter_path,
            final_eval_loss=r.final_eval_loss if r.HasField("final_eval_loss") else None,
            final_perplexity=r.final_perplexity if r.HasField("final_perplexity") else None,
            final_train_loss=r.final_train_loss if r.HasField("final_train_loss") else None,
            failure=failure_doc(r.failure) if r.HasField("failure") else None,
            last_step=r.last_step,
        )
    return Report(sequence=message.sequence, time=when, body=body)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_outbox(path: str) -> list[Report]:
    """Reports from a trainer's write-ahead outbox (one JSON AttemptReport per line).
    A torn last line (the trainer died mid-write) is ignored."""
    reports: list[Report] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    message = json_format.Parse(line, trainer_service_pb2.AttemptReport())
                except (json_format.ParseError, json.JSONDecodeError):
                    break
                reports.append(report(message))
    except FileNotFoundError:
        return []
    return reports


def duration(value: timedelta) -> duration_pb2.Duration:
    return _dur(value.total_seconds())


def queue(snap: Snapshot, version: int) -> queue_service_pb2.Queue:
    out = queue_service_pb2.Queue(version=version, time=_ts(snap.time))
    for entry in snap.queued:
        out.queued.append(
            queue_service_pb2.QueuedJob(
                job_id=entry.job.id,
                name=entry.job.name,
                position=entry.planned.position,
                estimated_start_time=_ts(entry.planned.start),
                estimated_duration=duration(entry.duration),
                confidence=entry.planned.confidence,
                promoted=entry.job.promote_time is not None,
                pool=entry.job.pool,
                queued_time=_ts(entry.job.create_time),
            )
        )
    for active in snap.active:
        out.active.append(
            queue_service_pb2.ActiveJob(
                job_id=active.job.id,
                name=active.job.name,
                state=enum_value(job_pb2.Job.State, active.job.state, "STATE_"),
                pool=active.job.pool,
                progress=active.progress,
                remaining=duration(active.remaining),
            )
        )
    for name, (slots, used, availability) in snap.pools.items():
        pool = queue_service_pb2.PoolStatus(name=name, slots=slots, used=used)
        if availability is not None:
            pool.spot_availability = availability
        out.pools.append(pool)
    out.stats.CopyFrom(
        queue_service_pb2.QueueStats(
            depth=len(snap.queued),
            active=len(snap.active),
            average_wait=duration(snap.average_wait),
            longest_wait=duration(snap.longest_wait),
            throughput_per_day=snap.throughput_per_day,
        )
    )
    return out


def audit_entry(row: QueueAuditRow) -> queue_service_pb2.QueueAuditEntry:
    return queue_service_pb2.QueueAuditEntry(
        id=row.id,
        job_id=row.job_id,
        action=row.action,
        reason=enum_value(queue_service_pb2.PromotionReason, row.reason, "PROMOTION_REASON_"),
        justification=row.justification,
        actor=row.actor,
        time=_ts(row.time),
        delayed_job_ids=[d["job_id"] for d in row.delayed],
    )


def usage(doc: Mapping[str, Any]) -> project_service_pb2.Usage:
    out = project_service_pb2.Usage(
        project=doc["project"],
        gpu_hours_used=doc["used"],
        reset_time=_ts(doc["reset"]),
        months=[
            project_service_pb2.MonthlySpend(month=m.month, gpu_hours=m.gpu_hours, spend_usd=m.spend_usd, jobs=m.jobs)
            for m in doc["months"]
        ],
    )
    if doc["quota"] is not None:
        out.gpu_hours_quota = doc["quota"]
        out.gpu_hours_remaining = doc["remaining"]
    forecast = _ts(doc["forecast"])
    if forecast is not None:
        out.forecast_exhaustion_time.CopyFrom(forecast)
    return out


def api_key(row: ApiKeyRow) -> api_key_service_pb2.ApiKey:
    return api_key_service_pb2.ApiKey(
        id=row.id,
        name=row.name,
        project=row.project,
        role=enum_value(api_key_service_pb2.Role, row.role, "ROLE_"),
        created_by=row.created_by,
        create_time=_ts(row.create_time),
        expire_time=_ts(row.expire_time),
        revoke_time=_ts(row.revoke_time),
        last_use_time=_ts(row.last_use_time),
    )
