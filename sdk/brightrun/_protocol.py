"""Request building, response parsing and stream-resume bookkeeping, shared by
the sync and async clients. Pure functions and small state objects: no I/O on
the network here (file digests for uploads are the one exception), so the sync
and async resources differ only in how they make the call.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import io
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import grpc
from pydantic import ValidationError

from brightrun.enums import (
    CancelReason,
    DatasetFormat,
    EventType,
    IssueOrder,
    JobState,
    LrScheduleMode,
    Preset,
    PricingTier,
    PromotionReason,
    RecoveryChoice,
    Role,
)
from brightrun.errors import ApiError, DeadlineExceededError, NoApplicableFixError, UnavailableError, from_grpc_error
from brightrun.pagination import Page
from brightrun.retry import CallKind, RetryPolicy
from brightrun.types import (
    ApiKey,
    Checkpoint,
    Dataset,
    DatasetIssue,
    FixSuggestions,
    JobBase,
    Promotion,
    QueueAuditEntry,
    RecoveryFix,
    RecoveryPolicy,
    TrainingConfig,
)
from brightrun.v1 import api_key_service_pb2, dataset_service_pb2, job_pb2, job_service_pb2, queue_service_pb2

#: Default upload chunk: 1 MiB, as the proto recommends.
DEFAULT_CHUNK_SIZE = 1024 * 1024

#: Names accepted as ``jobs.create(**overrides)``: the TrainingConfig fields.
OVERRIDE_FIELDS: tuple[str, ...] = tuple(TrainingConfig.model_fields)

#: Called with (bytes sent so far, total bytes) while a dataset uploads.
ProgressCallback = Callable[[int, int], object]


def new_request_id() -> str:
    """A fresh idempotency key (``[A-Za-z0-9-]``, 36 characters)."""
    return str(uuid.uuid4())


def resource_id(value: str | Any, kind: str) -> str:
    """The id of a resource given as an id or as a model with an ``id``."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{kind} id must not be empty")
        return value
    ident = getattr(value, "id", None)
    if isinstance(ident, str) and ident:
        return ident
    raise TypeError(f"expected a {kind} id or a {kind.capitalize()}, got {type(value).__name__}")


# ------------------------------------------------------------------ jobs


def training_overrides(overrides: Mapping[str, Any]) -> TrainingConfig:
    """Overrides as a TrainingConfig; TypeError for unknown names or wrong types."""
    unknown = [name for name in overrides if name not in OVERRIDE_FIELDS]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, OVERRIDE_FIELDS, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"unknown training override{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"allowed: {', '.join(OVERRIDE_FIELDS)}"
        )
    try:
        return TrainingConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise TypeError(f"invalid training override: {problems}") from None


def duration_proto(value: timedelta | float | None, name: str) -> Any:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive duration, got {value!r}")
    from google.protobuf import duration_pb2

    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


def create_job_request(
    *,
    dataset: str | Dataset,
    base_model: str,
    preset: Preset | str | int,
    name: str | None,
    gpu_type: str | None,
    pricing: PricingTier | str | None,
    max_duration: timedelta | float | None,
    labels: Mapping[str, str] | None,
    request_id: str | None,
    acknowledge_oom_risk: bool,
    overrides: Mapping[str, Any],
    description: str | None = None,
    force: bool = False,
    recovery_policy: RecoveryPolicy | None = None,
) -> job_service_pb2.CreateJobRequest:
    """The CreateJobRequest for ``jobs.create``; fills a request_id when absent."""
    request = job_service_pb2.CreateJobRequest(
        request_id=request_id or new_request_id(),
        name=name or "",
        dataset_id=resource_id(dataset, "dataset"),
        base_model=base_model,
        preset=int(Preset.parse(preset)),  # type: ignore[arg-type]
        overrides=training_overrides(overrides).to_proto(),
        compute=compute_proto(gpu_type, pricing, max_duration),
        labels=dict(labels or {}),
        acknowledge_oom_risk=acknowledge_oom_risk,
        description=description or "",
        force=force,
    )
    if recovery_policy is not None:
        request.recovery_policy.CopyFrom(recovery_policy.to_proto())
    return request


def compute_proto(
    gpu_type: str | None, pricing: PricingTier | str | None, max_duration: timedelta | float | None
) -> job_pb2.ComputeConfig:
    compute = job_pb2.ComputeConfig(gpu_type=gpu_type or "")
    if pricing is not None:
        compute.pricing_tier = int(PricingTier.parse(pricing))  # type: ignore[assignment]
    duration = duration_proto(max_duration, "max_duration")
    if duration is not None:
        compute.max_duration.CopyFrom(duration)
    return compute


def estimate_job_request(
    *,
    dataset: str | Dataset | None,
    base_model: str,
    preset: Preset | str | int,
    gpu_type: str | None,
    pricing: PricingTier | str | None,
    max_duration: timedelta | float | None,
    overrides: Mapping[str, Any],
) -> job_service_pb2.EstimateJobRequest:
    return job_service_pb2.EstimateJobRequest(
        dataset_id=resource_id(dataset, "dataset") if dataset is not None else "",
        base_model=base_model,
        preset=int(Preset.parse(preset)),  # type: ignore[arg-type]
        overrides=training_overrides(overrides).to_proto(),
        compute=compute_proto(gpu_type, pricing, max_duration),
    )


def list_jobs_request(
    *,
    filter: str | None,
    state: JobState | str | None,
    page_size: int | None,
    page_token: str,
    order_by: str | None = None,
    query: str | None = None,
) -> job_service_pb2.ListJobsRequest:
    parts = []
    if state is not None:
        parts.append(f"state = {JobState.parse(state).name}")
    if filter:
        parts.append(filter)
    return job_service_pb2.ListJobsRequest(
        filter=" AND ".join(parts),
        page_size=page_size or 0,
        page_token=page_token,
        order_by=order_by or "",
        query=query or "",
    )


def cancel_reason(reason: CancelReason | str | int) -> int:
    parsed = CancelReason.parse(reason)
    if parsed is CancelReason.UNSPECIFIED:
        raise ValueError(f"a cancel reason is required: one of {', '.join(CancelReason.choices())}")
    return int(parsed)


def cancel_request(job_id: str, reason: CancelReason | str | int, note: str) -> job_service_pb2.CancelJobRequest:
    return job_service_pb2.CancelJobRequest(job_id=job_id, reason=cancel_reason(reason), note=note)  # type: ignore[arg-type]


def event_types(types: Iterable[EventType | str | int] | EventType | str | None) -> list[int]:
    if types is None:
        return []
    if isinstance(types, str | int):
        types = [types]
    return [int(EventType.parse(t)) for t in types]


def jobs_page(response: job_service_pb2.ListJobsResponse, convert: Callable[[job_pb2.Job], Any]) -> Page[Any]:
    return Page(tuple(convert(j) for j in response.jobs), response.next_page_token)


# ------------------------------------------------------------------ recovery actions

#: What ``job.retry(fixes=...)`` accepts: fix ids, fixes, or a list of either.
FixesArg = str | RecoveryFix | Iterable[str | RecoveryFix] | None

#: Fields a continuation (``resume_from_checkpoint``) may change: the server's
#: list; it stays authoritative (e.g. epochs never above the original).
RESUME_CHANGEABLE_FIELDS: tuple[str, ...] = (
    "batch_size",
    "gradient_accumulation_steps",
    "epochs",
    "learning_rate",
    "warmup_ratio",
    "max_steps",
    "checkpoint_interval_steps",
    "eval_interval_steps",
    "gradient_checkpointing",
)
#: Fields that shape the adapter: a checkpoint cannot be continued with others.
RESUME_LOCKED_FIELDS: tuple[str, ...] = ("lora_rank", "lora_alpha", "target_modules")

#: What ``job.wait()`` does when the job awaits a decision.
OnDecision = Literal["raise", "return", "wait"]
ON_DECISION_MODES: tuple[str, ...] = ("raise", "return", "wait")


def job_ref(job: str | Any) -> str:
    return resource_id(job, "job")


def compute_change(gpu_type: str | None, pricing: PricingTier | str | None) -> job_pb2.ComputeConfig:
    """A ComputeConfig holding only what changes (unset fields keep the job's)."""
    return compute_proto(gpu_type, pricing, None)


def resume_request(
    job_id: str, gpu_type: str | None, pricing: PricingTier | str | None
) -> job_service_pb2.ResumeJobRequest:
    return job_service_pb2.ResumeJobRequest(job_id=job_ref(job_id), compute=compute_change(gpu_type, pricing))


def fix_ids(fixes: FixesArg) -> list[str]:
    """Fix ids from ids, :class:`RecoveryFix` objects or a list of either."""
    if fixes is None:
        return []
    items: Iterable[str | RecoveryFix] = [fixes] if isinstance(fixes, str | RecoveryFix) else fixes
    out: list[str] = []
    for item in items:
        ident = item.id if isinstance(item, RecoveryFix) else item
        if not isinstance(ident, str) or not ident:
            raise TypeError(f"a fix is a fix id or a RecoveryFix from suggest_fixes(), got {item!r}")
        out.append(ident)
    return list(dict.fromkeys(out))


def retry_request(
    job_id: str, fixes: FixesArg, *, request_id: str | None, acknowledge_oom_risk: bool, force: bool = False
) -> job_service_pb2.RetryJobRequest:
    """The RetryJobRequest; fills a request_id when absent (reused by every attempt)."""
    return job_service_pb2.RetryJobRequest(
        job_id=job_ref(job_id),
        request_id=request_id or new_request_id(),
        fix_ids=fix_ids(fixes),
        acknowledge_oom_risk=acknowledge_oom_risk,
        force=force,
    )


def no_applicable_fix(suggestions: FixSuggestions, job: JobBase) -> NoApplicableFixError:
    """The error for a job none of whose suggested fixes a retry can apply,
    quoting what the fixes ask the user to do."""
    cls = suggestions.failure_class
    if suggestions:
        advice = " ".join(f"{f.title}: {f.description}" for f in suggestions)
        message = f"no suggested fix for job {job.id} ({cls}) can be applied by a retry. {advice}"
    else:
        message = f"the server suggests no fix for job {job.id} ({cls})"
    return NoApplicableFixError(message, job=job, fixes=tuple(suggestions), failure_class=cls)


def bind_promotion(response: queue_service_pb2.PromoteJobResponse, bind: Callable[[job_pb2.Job], JobBase]) -> Promotion:
    """The Promotion of `response` with its job as a bound handle."""
    promotion = Promotion.from_proto(response)
    promotion.__dict__["job"] = bind(response.job)
    return promotion


def resume_changes(changes: Mapping[str, Any]) -> TrainingConfig:
    """Continuation changes as a TrainingConfig; TypeError for fields a
    continuation cannot change (locked or not changeable) and unknown names."""
    locked = [name for name in changes if name in RESUME_LOCKED_FIELDS]
    if locked:
        raise TypeError(
            f"{', '.join(repr(n) for n in locked)} {'is' if len(locked) == 1 else 'are'} locked on resume: "
            "the checkpoint's adapter has its rank, alpha and target modules; "
            f"changeable: {', '.join(RESUME_CHANGEABLE_FIELDS)}"
        )
    other = [name for name in changes if name not in RESUME_CHANGEABLE_FIELDS]
    if other:
        hints = []
        for name in other:
            close = difflib.get_close_matches(name, RESUME_CHANGEABLE_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if not close and name in OVERRIDE_FIELDS:
                hint = " (a continuation keeps it)"
            hints.append(f"{name!r}{hint}")
        raise TypeError(
            f"cannot change {', '.join(hints)} on resume; changeable: {', '.join(RESUME_CHANGEABLE_FIELDS)}"
        )
    return training_overrides(changes)


def resume_from_checkpoint_request(
    job_id: str,
    checkpoint: str | Checkpoint | None,
    *,
    lr_schedule: LrScheduleMode | str,
    gpu_type: str | None,
    pricing: PricingTier | str | None,
    request_id: str | None,
    changes: Mapping[str, Any],
    force: bool = False,
) -> job_service_pb2.ResumeFromCheckpointRequest:
    mode = LrScheduleMode.parse(lr_schedule)
    return job_service_pb2.ResumeFromCheckpointRequest(
        job_id=job_ref(job_id),
        checkpoint_id=resource_id(checkpoint, "checkpoint") if checkpoint is not None else "",
        request_id=request_id or new_request_id(),
        compute=compute_change(gpu_type, pricing),
        changes=resume_changes(changes).to_proto(),
        lr_schedule=int(mode),  # type: ignore[arg-type]
        force=force,
    )


def decide_request(job_id: str, choice: RecoveryChoice | str | int) -> job_service_pb2.DecideRecoveryRequest:
    parsed = RecoveryChoice.parse(choice)
    if parsed is RecoveryChoice.UNSPECIFIED:
        raise ValueError(f"a choice is required: one of {', '.join(RecoveryChoice.choices())}")
    return job_service_pb2.DecideRecoveryRequest(job_id=job_ref(job_id), choice=int(parsed))  # type: ignore[arg-type]


def is_state_conflict(error: grpc.RpcError) -> bool:
    """True for JOB_STATE_CONFLICT: a retried state change may find it already made."""
    return from_grpc_error(error).reason == "JOB_STATE_CONFLICT"


def resumed(job: job_pb2.Job) -> bool:
    """A ResumeJob took effect: the job left PAUSED."""
    return JobState(job.state) not in (JobState.PAUSED, JobState.PAUSING)


def decided(job: job_pb2.Job) -> bool:
    """A DecideRecovery took effect: the job no longer awaits a decision."""
    return JobState(job.state) is not JobState.AWAITING_DECISION


def checkpoints_of(response: job_service_pb2.ListJobCheckpointsResponse) -> list[Checkpoint]:
    return [Checkpoint.from_proto(c) for c in response.checkpoints]


def check_on_decision(on_decision: str) -> None:
    if on_decision not in ON_DECISION_MODES:
        raise ValueError(f"on_decision must be one of {', '.join(ON_DECISION_MODES)}, got {on_decision!r}")


# ------------------------------------------------------------------ listing, export, bulk cancel


def export_request(
    *, filter: str | None, state: JobState | str | None, query: str | None, order_by: str | None
) -> job_service_pb2.ExportJobsRequest:
    listed = list_jobs_request(filter=filter, state=state, page_size=None, page_token="", query=query)
    return job_service_pb2.ExportJobsRequest(filter=listed.filter, query=listed.query, order_by=order_by or "")


def bulk_cancel_request(
    job_ids: Iterable[str | Any] | None,
    *,
    filter: str | None,
    state: JobState | str | None,
    reason: CancelReason | str | int,
    note: str,
) -> job_service_pb2.BulkCancelJobsRequest:
    ids = [job_ref(j) for j in (job_ids or [])]
    listed = list_jobs_request(filter=filter, state=state, page_size=None, page_token="")
    if not ids and not listed.filter:
        raise ValueError("bulk_cancel needs job ids or a filter (or a state); it never cancels everything by default")
    return job_service_pb2.BulkCancelJobsRequest(
        job_ids=ids,
        filter=listed.filter,
        reason=cancel_reason(reason),  # type: ignore[arg-type]
        note=note,
    )


def bulk_cancel_kind(request: job_service_pb2.BulkCancelJobsRequest) -> CallKind:
    """Cancelling named jobs again answers the same; a filter would not match
    the jobs a lost attempt already cancelled, so such a call is not repeated."""
    return CallKind.WRITE if request.filter else CallKind.IDEMPOTENT


#: Where ``jobs.export`` writes: a path, or a file object opened for writing
#: (binary, or text: the CSV is decoded as UTF-8).
ExportTarget = str | os.PathLike[str] | IO[bytes] | IO[str]


class ExportSink:
    """Writes exported CSV chunks to a path or a file object. A path is
    written atomically: the bytes go to ``<path>.part``, renamed into place
    only once the whole export arrived, so a broken stream never leaves a
    truncated CSV behind."""

    def __init__(self, target: ExportTarget) -> None:
        self.target = target
        self.written = 0
        self._path: Path | None = None
        self._tmp: Path | None = None
        self._file: Any = None
        self._text = False
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        if isinstance(target, str | os.PathLike):
            self._path = Path(os.fspath(target))
        elif callable(getattr(target, "write", None)):
            self._file = target
            self._text = isinstance(target, io.TextIOBase)
        else:
            raise TypeError(f"export writes to a path or a writable file, got {type(target).__name__}")

    def open(self) -> None:
        if self._path is not None:
            self._tmp = self._path.with_name(self._path.name + ".part")
            self._file = self._tmp.open("wb")

    def write(self, chunk: bytes) -> None:
        if self._text:
            self._file.write(self._decoder.decode(chunk))
        else:
            self._file.write(chunk)
        self.written += len(chunk)

    def commit(self) -> None:
        if self._text:
            self._file.write(self._decoder.decode(b"", final=True))
        if self._path is not None and self._tmp is not None:
            self._file.close()
            os.replace(self._tmp, self._path)
        elif callable(getattr(self._file, "flush", None)):
            self._file.flush()

    def abort(self) -> None:
        if self._path is not None and self._tmp is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ queue


#: Length of a promotion's justification, as the contract requires.
JUSTIFICATION_LENGTH = (100, 500)


def promote_request(
    job_id: str | Any, reason: PromotionReason | str | int, justification: str
) -> queue_service_pb2.PromoteJobRequest:
    parsed = PromotionReason.parse(reason)
    if parsed is PromotionReason.UNSPECIFIED:
        raise ValueError(f"a promotion reason is required: one of {', '.join(PromotionReason.choices())}")
    low, high = JUSTIFICATION_LENGTH
    length = len(justification.strip())
    if not low <= length <= high:
        raise ValueError(f"the justification must be {low} to {high} characters (it is recorded), got {length}")
    return queue_service_pb2.PromoteJobRequest(
        job_id=job_ref(job_id),
        reason=int(parsed),  # type: ignore[arg-type]
        justification=justification.strip(),
    )


def audit_page(response: queue_service_pb2.ListQueueAuditResponse) -> Page[QueueAuditEntry]:
    return Page(tuple(QueueAuditEntry.from_proto(e) for e in response.entries), response.next_page_token)


# ------------------------------------------------------------------ API keys


def create_api_key_request(
    name: str, role: Role | str | int, ttl: timedelta | float | None
) -> api_key_service_pb2.CreateApiKeyRequest:
    """`ttl` is a timedelta or seconds; None: the key does not expire."""
    parsed = Role.parse(role)
    if parsed is Role.UNSPECIFIED:
        raise ValueError(f"a role is required: one of {', '.join(Role.choices())}")
    request = api_key_service_pb2.CreateApiKeyRequest(name=name, role=int(parsed))  # type: ignore[arg-type]
    duration = duration_proto(ttl, "ttl")
    if duration is not None:
        request.ttl.CopyFrom(duration)
    return request


def list_api_keys_request(
    *, show_revoked: bool, page_size: int | None, page_token: str
) -> api_key_service_pb2.ListApiKeysRequest:
    return api_key_service_pb2.ListApiKeysRequest(
        show_revoked=show_revoked, page_size=page_size or 0, page_token=page_token
    )


def api_keys_page(response: api_key_service_pb2.ListApiKeysResponse) -> Page[ApiKey]:
    return Page(tuple(ApiKey.from_proto(k) for k in response.api_keys), response.next_page_token)


def revoke_api_key_request(key: str | Any) -> api_key_service_pb2.RevokeApiKeyRequest:
    """From a key id, an ApiKey, a CreatedApiKey or a secret (``brk_<id>_...``:
    only the id it starts with is sent, so a leaked key can be revoked from its
    secret without sending the secret anywhere)."""
    ident = key if isinstance(key, str) else getattr(key, "id", None)
    if not isinstance(ident, str):
        raise TypeError(f"expected an API key id or an ApiKey, got {type(key).__name__}")
    match = _KEY_SECRET.fullmatch(ident)
    if match is not None:
        ident = match.group(1)
    if not ident:
        raise ValueError("API key id must not be empty")
    return api_key_service_pb2.RevokeApiKeyRequest(api_key_id=ident)


#: A key's secret: ``brk_<id>_<secret>``.
_KEY_SECRET = re.compile(r"brk_([a-z0-9]+)_[A-Za-z0-9]+")


# ------------------------------------------------------------------ datasets


@dataclass(frozen=True, slots=True)
class UploadPlan:
    """What an upload sends: the metadata (with size, checksum and request id)
    and where the bytes come from. Reused unchanged by every retry."""

    path: Path
    metadata: dataset_service_pb2.UploadDatasetMetadata
    chunk_size: int

    @property
    def size(self) -> int:
        return self.metadata.size_bytes

    def first_request(self) -> dataset_service_pb2.UploadDatasetRequest:
        return dataset_service_pb2.UploadDatasetRequest(metadata=self.metadata)


def plan_upload(
    path: str | Path,
    *,
    name: str | None,
    format: DatasetFormat | str | int | None,
    request_id: str | None,
    chunk_size: int,
) -> UploadPlan:
    """Reads the file once to compute its size and SHA-256."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such dataset file: {file}")
    digest = hashlib.sha256()
    size = 0
    with file.open("rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
            size += len(block)
    fmt = DatasetFormat.parse(format) if format is not None else DatasetFormat.UNSPECIFIED
    metadata = dataset_service_pb2.UploadDatasetMetadata(
        name=name or "",
        filename=file.name,
        format=int(fmt),  # type: ignore[arg-type]
        size_bytes=size,
        sha256=digest.hexdigest(),
        request_id=request_id or new_request_id(),
    )
    return UploadPlan(file, metadata, chunk_size)


class Progress:
    """Wraps a user's progress callback. gRPC consumes the request iterator (on
    its own thread for sync calls), so an exception from the callback would
    surface only as a cancelled call: it is kept here and re-raised as itself."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.error: BaseException | None = None

    def __call__(self, sent: int, total: int) -> None:
        if self.callback is None:
            return
        try:
            self.callback(sent, total)
        except BaseException as e:
            self.error = e
            raise

    def reraise(self) -> None:
        """Raise the callback's exception, if it raised one."""
        if self.error is not None:
            raise self.error


def upload_requests(
    plan: UploadPlan, progress: ProgressCallback | None
) -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
    """The metadata message, then the file in chunks; reports progress as it goes."""
    yield plan.first_request()
    sent = 0
    if progress is not None:
        progress(0, plan.size)
    with plan.path.open("rb") as f:
        while chunk := f.read(plan.chunk_size):
            yield dataset_service_pb2.UploadDatasetRequest(chunk=chunk)
            sent += len(chunk)
            if progress is not None:
                progress(sent, plan.size)


def validation_errors_request(
    dataset_id: str,
    *,
    order_by: IssueOrder | str | None,
    critical_only: bool,
    types: Iterable[str] | None,
    include_context: bool,
    page_size: int | None,
    page_token: str,
) -> dataset_service_pb2.ListValidationErrorsRequest:
    return dataset_service_pb2.ListValidationErrorsRequest(
        dataset_id=resource_id(dataset_id, "dataset"),
        page_size=page_size or 0,
        page_token=page_token,
        order_by=int(IssueOrder.parse(order_by)) if order_by is not None else 0,  # type: ignore[arg-type]
        critical_only=critical_only,
        types=list(types or []),
        include_context=include_context,
    )


def issues_page(response: dataset_service_pb2.ListValidationErrorsResponse) -> Page[DatasetIssue]:
    return Page(
        tuple(DatasetIssue.from_proto(i) for i in response.issues), response.next_page_token, response.total_size
    )


# ------------------------------------------------------------------ streams


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class _HasSequence(Protocol):
    @property
    def sequence(self) -> int: ...


@dataclass
class StreamResume:
    """Bookkeeping of a resumable stream (metrics, events, watch).

    The cursor is the next sequence number wanted (sequences start at 1, so
    a cursor of 1 means "from the beginning"). Items below it are
    duplicates of a replay and dropped; each accepted item moves it on. After an
    error or a premature end the stream reopens from the cursor, waiting
    :meth:`RetryPolicy.delay` between attempts; the attempt count resets whenever
    an item arrives, and the policy's ``max_attempts`` bounds consecutive failures.
    """

    policy: RetryPolicy
    cursor: int
    deadline: float | None = None
    failures: int = 0
    last_error: BaseException | None = field(default=None, repr=False)

    def accept(self, sequence: int) -> bool:
        if sequence < self.cursor:
            return False
        self.cursor = sequence + 1
        self.failures = 0
        return True

    def open_timeout(self) -> float | None:
        """Timeout for the next connection; raises once the deadline passed."""
        left = remaining(self.deadline)
        if left is not None and left <= 0:
            raise DeadlineExceededError("deadline exceeded while streaming")
        return left

    def after_error(self, error: ApiError) -> float:
        """Delay before reopening after `error`; re-raises it when final."""
        self.failures += 1
        self.last_error = error
        if not self.policy.should_resume(error) or self.failures >= self.policy.max_attempts:
            raise error
        return self._bounded(self.policy.delay(self.failures, error))

    def after_end(self, *, done: bool, terminal: bool) -> float | None:
        """None when the stream is complete; else the delay before reopening.

        `done` says the job is terminal and everything up to its last sequence
        arrived; `terminal` that it is terminal (then the rest is stored and
        reopening at once fetches it).
        """
        if done:
            return None
        self.failures += 1
        if self.failures >= self.policy.max_attempts:
            raise UnavailableError("the stream kept ending before the job finished")
        return 0.0 if terminal else self._bounded(self.policy.backoff(self.failures))

    def _bounded(self, delay: float) -> float:
        left = remaining(self.deadline)
        return delay if left is None else max(0.0, min(delay, left))


@dataclass
class FollowState:
    """Bookkeeping of a snapshot stream without a durable cursor (WatchQueue:
    its version is per server replica and restarts with it). After an error
    or an end the stream reopens for the current snapshot; a snapshot with the
    key just delivered is dropped, so a reconnect does not repeat it. The
    attempt count resets whenever a snapshot arrives; reaching `deadline`
    ends the stream quietly."""

    policy: RetryPolicy
    deadline: float | None = None
    failures: int = 0
    last_key: Any = None

    def accept(self, key: Any) -> bool:
        self.failures = 0
        if key == self.last_key:
            return False
        self.last_key = key
        return True

    def expired(self) -> bool:
        left = remaining(self.deadline)
        return left is not None and left <= 0.05  # gRPC's own deadline may fire a little early

    def open_timeout(self) -> float | None:
        return remaining(self.deadline)

    def after_error(self, error: ApiError) -> float:
        self.failures += 1
        if not self.policy.should_resume(error) or self.failures >= self.policy.max_attempts:
            raise error
        return self._bounded(self.policy.delay(self.failures, error))

    def after_end(self) -> float:
        self.failures += 1
        if self.failures >= self.policy.max_attempts:
            raise UnavailableError("the stream kept ending; the server may be shutting down")
        return self._bounded(self.policy.backoff(self.failures))

    def _bounded(self, delay: float) -> float:
        left = remaining(self.deadline)
        return delay if left is None else max(0.0, min(delay, left))


def metrics_done(job: JobBase | job_pb2.Job, cursor: int) -> bool:
    return JobState(job.state).is_terminal and cursor > job.last_metric_sequence


def events_done(job: JobBase | job_pb2.Job, cursor: int) -> bool:
    return JobState(job.state).is_terminal and cursor > job.last_event_sequence


def call_metadata(
    api_key: str | None, extra: Iterable[tuple[str, str]], request_id: str | None = None
) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    if api_key:
        out.append(("authorization", f"Bearer {api_key}"))
    out.extend(extra)
    if request_id:
        out.append(("x-request-id", request_id))
    return tuple(out)
