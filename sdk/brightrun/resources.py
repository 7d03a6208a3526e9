"""``client.datasets``, ``client.jobs``, ``client.queue``, ``client.projects`` and
``client.api_keys``: one method per RPC, sync and async.

Requests are built and responses parsed by :mod:`brightrun._protocol` and
:mod:`brightrun.types`; the sync and async classes differ only in making the call.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from brightrun import _protocol as proto
from brightrun._protocol import DEFAULT_CHUNK_SIZE, ExportTarget, FixesArg, OnDecision, ProgressCallback, UploadPlan
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
from brightrun.job import AsyncJob, Job
from brightrun.pagination import AsyncPager, Page, Pager
from brightrun.retry import CallKind
from brightrun.types import (
    ApiKey,
    BulkCancelResult,
    Checkpoint,
    CreatedApiKey,
    Dataset,
    DatasetIssue,
    FailureReport,
    FixSuggestions,
    JobEstimate,
    JobEvent,
    MetricPoint,
    Promotion,
    QueueAuditEntry,
    QueueSnapshot,
    RecoveryPolicy,
    Usage,
)
from brightrun.v1 import (
    dataset_pb2,
    dataset_service_pb2,
    job_pb2,
    job_service_pb2,
    project_service_pb2,
    queue_service_pb2,
)

if TYPE_CHECKING:
    from brightrun._transport import AsyncTransport, Metadata, SyncTransport

__all__ = [
    "ApiKeys",
    "AsyncApiKeys",
    "AsyncDatasets",
    "AsyncJobs",
    "AsyncProjects",
    "AsyncQueue",
    "Datasets",
    "Jobs",
    "Projects",
    "Queue",
]

EventTypes = Iterable[EventType | str | int] | EventType | str | None

_NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _watch_sequence(response: job_service_pb2.WatchJobResponse) -> int:
    return response.job.version


def _metric_sequence(response: job_service_pb2.StreamJobMetricsResponse) -> int:
    return response.metric.sequence


def _event_sequence(response: job_service_pb2.StreamJobEventsResponse) -> int:
    return response.event.sequence


def _queue_version(response: queue_service_pb2.WatchQueueResponse) -> int:
    return response.queue.version


# ====================================================================== sync


class Datasets:
    """Upload, inspect and delete datasets (``DatasetService``)."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def upload(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        format: DatasetFormat | str | None = None,
        request_id: str | None = None,
        progress: ProgressCallback | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float | None = None,
    ) -> Dataset:
        """Upload and validate a training file; return the stored dataset.

        The file's size and SHA-256 are computed first and sent with the
        metadata, so the server rejects a corrupted transfer
        (``UPLOAD_CORRUPTED``). The request id (generated when not given) is the
        same on every retry, so a retried upload returns the dataset the first
        attempt stored. `progress(sent_bytes, total_bytes)` is called as chunks
        go out (from a gRPC thread; it restarts from 0 if the upload is retried).
        `timeout` bounds each attempt; ``None`` means no limit.
        """
        plan = proto.plan_upload(path, name=name, format=format, request_id=request_id, chunk_size=chunk_size)
        return self._upload(plan, progress, timeout)

    def _upload(self, plan: UploadPlan, progress: ProgressCallback | None, timeout: float | None) -> Dataset:
        report = proto.Progress(progress)

        def attempt(t: float | None, md: Metadata) -> dataset_pb2.Dataset:
            try:
                return self._t.datasets.UploadDataset(proto.upload_requests(plan, report), timeout=t, metadata=md)
            except grpc.RpcError:
                report.reraise()
                raise

        return Dataset.from_proto(self._t.invoke(attempt, kind=CallKind.IDEMPOTENT, timeout=timeout))

    def get(self, dataset_id: str) -> Dataset:
        """One dataset; NotFoundError (``DATASET_NOT_FOUND``) if it does not exist."""
        request = dataset_service_pb2.GetDatasetRequest(dataset_id=proto.resource_id(dataset_id, "dataset"))
        return Dataset.from_proto(self._t.unary(self._t.datasets.GetDataset, request, kind=CallKind.READ))

    def list(
        self,
        *,
        filter: str | None = None,
        page_size: int | None = None,
        page_token: str = "",
        limit: int | None = None,
    ) -> Pager[Dataset]:
        """Datasets, newest first, fetched a page at a time as you iterate.

        `filter` e.g. ``'state = READY AND name = "support"'`` (fields: state,
        format, name); `limit` stops after that many datasets.
        """

        def fetch(token: str) -> Page[Dataset]:
            request = dataset_service_pb2.ListDatasetsRequest(
                filter=filter or "", page_size=page_size or 0, page_token=token
            )
            response = self._t.unary(self._t.datasets.ListDatasets, request, kind=CallKind.READ)
            return Page(tuple(Dataset.from_proto(d) for d in response.datasets), response.next_page_token)

        return Pager(fetch, page_token=page_token, limit=limit)

    def delete(self, dataset_id: str) -> None:
        """Delete a dataset no unfinished job uses (else FailedPreconditionError,
        ``DATASET_IN_USE``). Safe to retry: a retry that finds the dataset
        already gone (deleted by the attempt that lost its connection) succeeds."""
        request = dataset_service_pb2.DeleteDatasetRequest(dataset_id=proto.resource_id(dataset_id, "dataset"))
        attempts = 0

        def attempt(t: float | None, md: Metadata) -> None:
            nonlocal attempts
            attempts += 1
            try:
                self._t.datasets.DeleteDataset(request, timeout=t, metadata=md)
            except grpc.RpcError as e:
                if attempts > 1 and e.code() == _NOT_FOUND:
                    return
                raise

        self._t.invoke(attempt, kind=CallKind.IDEMPOTENT)

    def validate(self, dataset_id: str, *, base_model: str | None = None, max_seq_length: int | None = None) -> Dataset:
        """Validate a stored dataset again — with `base_model`'s tokenizer and chat
        template for the token checks, if given — and return it with the results."""
        request = dataset_service_pb2.ValidateDatasetRequest(
            dataset_id=proto.resource_id(dataset_id, "dataset"),
            base_model=base_model or "",
            max_seq_length=max_seq_length or 0,
        )
        return Dataset.from_proto(self._t.unary(self._t.datasets.ValidateDataset, request, kind=CallKind.IDEMPOTENT))

    def list_errors(
        self,
        dataset_id: str,
        *,
        order_by: IssueOrder | str | None = None,
        critical_only: bool = False,
        types: Iterable[str] | None = None,
        include_context: bool = False,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> Pager[DatasetIssue]:
        """The problems the latest validation found, paged: sorted by
        ``"index"`` (default), ``"type"`` or ``"severity"``, optionally only
        critical ones or some error types, with context excerpts if asked.
        Each page's ``total_size`` counts the matches across all pages."""

        def fetch(token: str) -> Page[DatasetIssue]:
            request = proto.validation_errors_request(
                dataset_id,
                order_by=order_by,
                critical_only=critical_only,
                types=types,
                include_context=include_context,
                page_size=page_size,
                page_token=token,
            )
            return proto.issues_page(self._t.unary(self._t.datasets.ListValidationErrors, request, kind=CallKind.READ))

        return Pager(fetch, limit=limit)

    def export_errors(
        self, dataset_id: str, *, critical_only: bool = False, order_by: IssueOrder | str | None = None
    ) -> Iterator[bytes]:
        """The problems as CSV (header first), streamed in chunks of UTF-8 bytes."""
        request = dataset_service_pb2.ExportValidationErrorsRequest(
            dataset_id=proto.resource_id(dataset_id, "dataset"),
            critical_only=critical_only,
            order_by=int(IssueOrder.parse(order_by)) if order_by is not None else 0,  # type: ignore[arg-type]
        )
        stub = self._t.datasets
        for response in self._t.stream_once(
            lambda timeout, md: stub.ExportValidationErrors(request, timeout=timeout, metadata=md)
        ):
            yield response.chunk


class Jobs:
    """Create, inspect, follow and cancel fine-tuning jobs (``JobService``)."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def _job(self, message: job_pb2.Job) -> Job:
        return Job._bound(message, self)

    def create(
        self,
        *,
        dataset: str | Dataset,
        base_model: str,
        preset: Preset | str = Preset.BALANCED,
        name: str | None = None,
        gpu_type: str | None = None,
        pricing: PricingTier | str | None = None,
        max_duration: timedelta | float | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        description: str | None = None,
        force: bool = False,
        recovery_policy: RecoveryPolicy | None = None,
        **overrides: Any,
    ) -> Job:
        """Create a job and queue it.

        Args:
            dataset: the dataset (or its id) to train on.
            base_model: a hub model name or a local model directory.
            preset: ``"conservative"``, ``"balanced"`` (default) or ``"aggressive"``.
            name: display name; the server derives one when omitted.
            gpu_type: a GPU type from the server's catalog (default H100-80GB).
            pricing: ``"spot"`` (default) or ``"on_demand"``.
            max_duration: the job fails as training_timeout after this long
                (a timedelta or seconds; default 24 h).
            labels: free-form key/value labels.
            request_id: idempotency key; generated when omitted and reused on
                every retry, so a retried create returns the same job.
            acknowledge_oom_risk: create the job even when its estimate puts it
                at high risk of running out of memory (otherwise refused with
                FailedPreconditionError, reason ``OOM_RISK_HIGH``).
            description: free text, searchable with ``jobs.list(query=...)``.
            force: start it even though an unfinished job already trains this
                dataset with this configuration (otherwise refused with
                AlreadyExistsError, reason ``DUPLICATE_JOB``).
            recovery_policy: how the server recovers the job from failures;
                unset fields take the server's defaults.
            **overrides: TrainingConfig fields replacing the preset's values
                (``lora_rank=``, ``learning_rate=``, ``epochs=``,
                ``batch_size=``, ``max_seq_length=``, ``quantization="nf4"``, ...).
                Unknown names raise TypeError; out-of-range values raise
                InvalidArgumentError naming the field.
        """
        request = proto.create_job_request(
            dataset=dataset,
            base_model=base_model,
            preset=preset,
            name=name,
            gpu_type=gpu_type,
            pricing=pricing,
            max_duration=max_duration,
            labels=labels,
            request_id=request_id,
            acknowledge_oom_risk=acknowledge_oom_risk,
            overrides=overrides,
            description=description,
            force=force,
            recovery_policy=recovery_policy,
        )
        return self._job(self._t.unary(self._t.jobs.CreateJob, request, kind=CallKind.IDEMPOTENT))

    def estimate(
        self,
        *,
        base_model: str,
        dataset: str | Dataset | None = None,
        preset: Preset | str = Preset.BALANCED,
        gpu_type: str | None = None,
        pricing: PricingTier | str | None = None,
        max_duration: timedelta | float | None = None,
        **overrides: Any,
    ) -> JobEstimate:
        """Estimate a configuration's memory (with OOM risk and ranked fixes),
        duration and cost without creating anything. Arguments as :meth:`create`;
        duration and cost need the `dataset`."""
        request = proto.estimate_job_request(
            dataset=dataset,
            base_model=base_model,
            preset=preset,
            gpu_type=gpu_type,
            pricing=pricing,
            max_duration=max_duration,
            overrides=overrides,
        )
        response = self._t.unary(self._t.jobs.EstimateJob, request, kind=CallKind.READ)
        return JobEstimate.from_proto(response.estimate)

    def _get_proto(self, job_id: str) -> job_pb2.Job:
        request = job_service_pb2.GetJobRequest(job_id=proto.resource_id(job_id, "job"))
        return self._t.unary(self._t.jobs.GetJob, request, kind=CallKind.READ)

    def get(self, job_id: str) -> Job:
        """One job; NotFoundError (``JOB_NOT_FOUND``) if it does not exist."""
        return self._job(self._get_proto(job_id))

    def list(
        self,
        *,
        filter: str | None = None,
        state: JobState | str | None = None,
        page_size: int | None = None,
        page_token: str = "",
        limit: int | None = None,
        order_by: str | None = None,
        query: str | None = None,
    ) -> Pager[Job]:
        """Jobs, newest first, fetched a page at a time as you iterate.

        `filter` e.g. ``'preset = BALANCED AND labels.team = "nlp"'`` (fields:
        state, dataset_id, base_model, preset, name, create_time, labels.KEY);
        `state` adds ``state = X``; `query` matches name, description or labels;
        `order_by` e.g. ``"spend_usd desc"`` (default newest first); `limit`
        stops after that many jobs.
        """

        def fetch(token: str) -> Page[Job]:
            request = proto.list_jobs_request(
                filter=filter, state=state, page_size=page_size, page_token=token, order_by=order_by, query=query
            )
            return proto.jobs_page(self._t.unary(self._t.jobs.ListJobs, request, kind=CallKind.READ), self._job)

        return Pager(fetch, page_token=page_token, limit=limit)

    def _cancel_proto(self, job_id: str, *, reason: CancelReason | str, note: str) -> job_pb2.Job:
        request = proto.cancel_request(proto.resource_id(job_id, "job"), reason, note)
        return self._t.unary(self._t.jobs.CancelJob, request, kind=CallKind.IDEMPOTENT)

    def cancel(self, job_id: str, *, reason: CancelReason | str, note: str = "") -> Job:
        """Ask a job to stop. A queued job is cancelled at once; a running one
        moves to CANCELLING and reaches CANCELLED within 60 s, keeping its
        metrics, events and checkpoints. `reason` is a CancelReason or its
        lowercase name (``"testing"``, ``"cost_too_high"``, ...); `note` ≤ 500 chars."""
        return self._job(self._cancel_proto(job_id, reason=reason, note=note))

    def wait(self, job_id: str, *, timeout: float | None = None, on_decision: OnDecision = "raise") -> Job:
        """Block until the job is terminal and return it; see :meth:`Job.wait`."""
        return self.get(job_id).wait(timeout, on_decision=on_decision)

    def _watch_protos(self, job_id: str, *, from_version: int, deadline: float | None) -> Iterator[job_pb2.Job]:
        job_id = proto.resource_id(job_id, "job")
        stub = self._t.jobs

        def open_call(cursor: int, timeout: float | None, md: Metadata) -> Any:
            return stub.WatchJob(
                job_service_pb2.WatchJobRequest(job_id=job_id, from_sequence=cursor), timeout=timeout, metadata=md
            )

        def check_done(cursor: int) -> tuple[bool, bool]:
            job = self._get_proto(job_id)
            terminal = JobState(job.state).is_terminal
            return terminal and cursor > job.version, terminal

        for response in self._t.stream(
            open_call,
            start=from_version,
            sequence_of=_watch_sequence,
            check_done=check_done,
            deadline=deadline,
        ):
            yield response.job

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[Job]:
        """Snapshots of a job each time it changes, until it is terminal."""
        return self.get(job_id).watch(timeout=timeout)

    def stream_metrics(
        self, job_id: str, *, from_sequence: int = 0, from_step: int | None = None
    ) -> Iterator[MetricPoint]:
        """A job's metric points from `from_sequence`: backlog, then live, each
        exactly once and in order even across reconnects; ends when the job is
        terminal and every point was delivered."""
        job_id = proto.resource_id(job_id, "job")
        stub = self._t.jobs

        def open_call(cursor: int, timeout: float | None, md: Metadata) -> Any:
            request = job_service_pb2.StreamJobMetricsRequest(job_id=job_id, from_sequence=cursor)
            return stub.StreamJobMetrics(request, timeout=timeout, metadata=md)

        def check_done(cursor: int) -> tuple[bool, bool]:
            job = self._get_proto(job_id)
            return proto.metrics_done(job, cursor), JobState(job.state).is_terminal

        for response in self._t.stream(
            open_call, start=from_sequence, sequence_of=_metric_sequence, check_done=check_done
        ):
            if from_step is None or response.metric.step >= from_step:
                yield MetricPoint.from_proto(response.metric)

    def stream_events(self, job_id: str, *, types: EventTypes = None, from_sequence: int = 0) -> Iterator[JobEvent]:
        """A job's events from `from_sequence` (only `types`, if given), like
        :meth:`stream_metrics`."""
        job_id = proto.resource_id(job_id, "job")
        wanted = frozenset(proto.event_types(types))
        stub = self._t.jobs

        # The stream is opened unfiltered and filtered here: the cursor then sees
        # every sequence number, so "everything arrived" is exact even when the
        # wanted types end before the log does.
        def open_call(cursor: int, timeout: float | None, md: Metadata) -> Any:
            request = job_service_pb2.StreamJobEventsRequest(job_id=job_id, from_sequence=cursor)
            return stub.StreamJobEvents(request, timeout=timeout, metadata=md)

        def check_done(cursor: int) -> tuple[bool, bool]:
            job = self._get_proto(job_id)
            return proto.events_done(job, cursor), JobState(job.state).is_terminal

        for response in self._t.stream(
            open_call, start=from_sequence, sequence_of=_event_sequence, check_done=check_done
        ):
            if not wanted or response.event.type in wanted:
                yield JobEvent.from_proto(response.event)

    def list_metrics(self, job_id: str, *, page_size: int | None = None) -> Pager[MetricPoint]:
        """A job's stored metric points in sequence order, paged."""
        job_id = proto.resource_id(job_id, "job")

        def fetch(token: str) -> Page[MetricPoint]:
            request = job_service_pb2.ListJobMetricsRequest(job_id=job_id, page_size=page_size or 0, page_token=token)
            response = self._t.unary(self._t.jobs.ListJobMetrics, request, kind=CallKind.READ)
            return Page(tuple(MetricPoint.from_proto(m) for m in response.metrics), response.next_page_token)

        return Pager(fetch)

    def list_events(
        self,
        job_id: str,
        *,
        query: str | None = None,
        types: EventTypes = None,
        page_size: int | None = None,
    ) -> Pager[JobEvent]:
        """A job's stored events in sequence order, paged; `query` matches
        message or code ignoring case, `types` keeps only those types."""
        job_id = proto.resource_id(job_id, "job")
        wanted: Any = proto.event_types(types)

        def fetch(token: str) -> Page[JobEvent]:
            request = job_service_pb2.ListJobEventsRequest(
                job_id=job_id, page_size=page_size or 0, page_token=token, types=wanted, query=query or ""
            )
            response = self._t.unary(self._t.jobs.ListJobEvents, request, kind=CallKind.READ)
            return Page(tuple(JobEvent.from_proto(e) for e in response.events), response.next_page_token)

        return Pager(fetch)

    # ------------------------------------------------------------ control and recovery

    def _converge(
        self, method: Callable[..., job_pb2.Job], request: Any, settled: Callable[[job_pb2.Job], bool]
    ) -> job_pb2.Job:
        """A state change retried like an idempotent call: when a retry finds the
        change already made (the first attempt's response was lost), the job
        is the answer instead of a JOB_STATE_CONFLICT."""
        attempts = 0

        def attempt(t: float | None, md: Metadata) -> job_pb2.Job:
            nonlocal attempts
            attempts += 1
            try:
                return method(request, timeout=t, metadata=md)
            except grpc.RpcError as e:
                if attempts > 1 and proto.is_state_conflict(e):
                    job = self._get_proto(request.job_id)
                    if settled(job):
                        return job
                raise

        return self._t.invoke(attempt, kind=CallKind.IDEMPOTENT)

    def _pause_proto(self, job_id: str) -> job_pb2.Job:
        request = job_service_pb2.PauseJobRequest(job_id=proto.job_ref(job_id))
        return self._t.unary(self._t.jobs.PauseJob, request, kind=CallKind.IDEMPOTENT)

    def pause(self, job_id: str) -> Job:
        """Checkpoint a TRAINING job and stop its worker; costs stop. The job
        moves to PAUSING, then PAUSED (``wait()`` keeps waiting through both).
        Pausing a job in another state raises FailedPreconditionError
        (``JOB_STATE_CONFLICT``); pausing a paused job changes nothing."""
        return self._job(self._pause_proto(job_id))

    def _resume_proto(self, job_id: str, *, gpu_type: str | None, pricing: PricingTier | str | None) -> job_pb2.Job:
        return self._converge(self._t.jobs.ResumeJob, proto.resume_request(job_id, gpu_type, pricing), proto.resumed)

    def resume(self, job_id: str, *, gpu_type: str | None = None, pricing: PricingTier | str | None = None) -> Job:
        """Queue a PAUSED job again; its next attempt continues from the pause
        checkpoint, on `gpu_type` / `pricing` (``"spot"``, ``"on_demand"``) if given."""
        return self._job(self._resume_proto(job_id, gpu_type=gpu_type, pricing=pricing))

    def retry(
        self,
        job_id: str,
        *,
        fixes: FixesArg = None,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        force: bool = False,
    ) -> Job:
        """Create a new job retrying a FAILED or CANCELLED one: the same
        configuration, or with `fixes` applied (fix ids or fixes from
        :meth:`suggest_fixes`, combinable unless incompatible). The new job is
        linked (``lineage.retry_of``) and named "X (Retry #n)"; at most 5
        retries descend from one original job (``RETRY_LIMIT_REACHED``). The
        request id (generated when omitted) is reused by every attempt, so a
        retried call never creates a second job. `force` creates it even
        though an unfinished job already trains the same data and
        configuration (otherwise AlreadyExistsError, ``DUPLICATE_JOB``)."""
        request = proto.retry_request(
            job_id, fixes, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
        )
        return self._job(self._t.unary(self._t.jobs.RetryJob, request, kind=CallKind.IDEMPOTENT))

    def suggest_fixes(self, job_id: str) -> FixSuggestions:
        """The fixes for a failed (or cancelled) job, best first, each with its
        changes, expected effect and confidence from recorded outcomes."""
        request = job_service_pb2.SuggestFixesRequest(job_id=proto.job_ref(job_id))
        return FixSuggestions.from_proto(self._t.unary(self._t.jobs.SuggestFixes, request, kind=CallKind.READ))

    def retry_with_suggested_fix(
        self,
        job_id: str,
        fix: FixesArg = None,
        *,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        force: bool = False,
    ) -> Job:
        """Retry with a suggested fix: by default the best one a retry can
        apply; or the fix id(s) / fix(es) given. Raises
        :class:`~brightrun.NoApplicableFixError` when every suggested fix needs
        a user's action first (a dataset error: fix the file and upload it).
        `force` as in :meth:`retry`."""
        if fix is None:
            suggestions = self.suggest_fixes(job_id)
            fix = suggestions.top
            if fix is None:
                raise proto.no_applicable_fix(suggestions, self.get(job_id))
        return self.retry(
            job_id, fixes=fix, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
        )

    def resume_from_checkpoint(
        self,
        job_id: str,
        checkpoint: str | Checkpoint | None = None,
        *,
        lr_schedule: LrScheduleMode | str = LrScheduleMode.CONTINUE,
        gpu_type: str | None = None,
        pricing: PricingTier | str | None = None,
        request_id: str | None = None,
        force: bool = False,
        **changes: Any,
    ) -> Job:
        """Create a continuation job that resumes from a checkpoint of an ended
        job: `checkpoint` (an id or a Checkpoint) or the newest one that
        verifies. `lr_schedule` is ``"continue"`` or ``"restart_warmup"``.
        `**changes` may set batch_size, gradient_accumulation_steps, epochs
        (never above the original), learning_rate, warmup_ratio, max_steps,
        checkpoint_interval_steps, eval_interval_steps or
        gradient_checkpointing; anything else (lora_rank, lora_alpha and
        target_modules are locked) raises TypeError before any call. The
        server stays authoritative (InvalidArgumentError naming the field).
        `force` creates it even though an unfinished job already trains the
        same data and configuration (otherwise AlreadyExistsError,
        ``DUPLICATE_JOB``)."""
        request = proto.resume_from_checkpoint_request(
            job_id,
            checkpoint,
            lr_schedule=lr_schedule,
            gpu_type=gpu_type,
            pricing=pricing,
            request_id=request_id,
            changes=changes,
            force=force,
        )
        return self._job(self._t.unary(self._t.jobs.ResumeFromCheckpoint, request, kind=CallKind.IDEMPOTENT))

    def failure_report(self, job_id: str) -> FailureReport:
        """What happened to a failed or cancelled job, where, what it left
        behind and what can be done (FailedPreconditionError for other states)."""
        request = job_service_pb2.GetFailureReportRequest(job_id=proto.job_ref(job_id))
        return FailureReport.from_proto(self._t.unary(self._t.jobs.GetFailureReport, request, kind=CallKind.READ))

    def _decide_proto(self, job_id: str, choice: RecoveryChoice | str) -> job_pb2.Job:
        return self._converge(self._t.jobs.DecideRecovery, proto.decide_request(job_id, choice), proto.decided)

    def decide(self, job_id: str, choice: RecoveryChoice | str) -> Job:
        """Choose how a job AWAITING_DECISION continues: one of its
        ``decision.choices`` (``"keep_trying"``, ``"switch_to_on_demand"``,
        ``"cancel"``, ...)."""
        return self._job(self._decide_proto(job_id, choice))

    def list_checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        """A job's complete checkpoints, newest first."""
        request = job_service_pb2.ListJobCheckpointsRequest(job_id=proto.job_ref(job_id))
        return proto.checkpoints_of(self._t.unary(self._t.jobs.ListJobCheckpoints, request, kind=CallKind.READ))

    def _on_demand_proto(self, job_id: str) -> job_pb2.Job:
        request = job_service_pb2.SwitchToOnDemandRequest(job_id=proto.job_ref(job_id))
        return self._t.unary(self._t.jobs.SwitchToOnDemand, request, kind=CallKind.IDEMPOTENT)

    def switch_to_on_demand(self, job_id: str) -> Job:
        """Move an unfinished job to on-demand capacity: a running spot attempt
        continues; later attempts and provisioning use on-demand."""
        return self._job(self._on_demand_proto(job_id))

    def _promote_proto(
        self, job_id: str, reason: PromotionReason | str, justification: str
    ) -> queue_service_pb2.PromoteJobResponse:
        request = proto.promote_request(job_id, reason, justification)
        return self._t.unary(self._t.queue.PromoteJob, request, kind=CallKind.WRITE)

    # ------------------------------------------------------------ many jobs

    def iter_export(
        self,
        *,
        filter: str | None = None,
        state: JobState | str | None = None,
        query: str | None = None,
        order_by: str | None = None,
    ) -> Iterator[bytes]:
        """The jobs matching `filter` / `state` / `query` (as :meth:`list`) as
        CSV, header first, streamed in chunks of UTF-8 bytes."""
        request = proto.export_request(filter=filter, state=state, query=query, order_by=order_by)
        stub = self._t.jobs
        for response in self._t.stream_once(lambda timeout, md: stub.ExportJobs(request, timeout=timeout, metadata=md)):
            yield response.chunk

    def export(
        self,
        dest: ExportTarget,
        *,
        filter: str | None = None,
        state: JobState | str | None = None,
        query: str | None = None,
        order_by: str | None = None,
    ) -> int:
        """Write the matching jobs as CSV to `dest` — a path (written
        atomically: nothing appears unless the whole export arrived) or a file
        opened for writing, binary or text — and return the bytes written."""
        sink = proto.ExportSink(dest)
        sink.open()
        try:
            for chunk in self.iter_export(filter=filter, state=state, query=query, order_by=order_by):
                sink.write(chunk)
        except BaseException:
            sink.abort()
            raise
        sink.commit()
        return sink.written

    def bulk_cancel(
        self,
        job_ids: Iterable[str | Job] | None = None,
        *,
        filter: str | None = None,
        state: JobState | str | None = None,
        reason: CancelReason | str,
        note: str = "",
    ) -> builtins.list[BulkCancelResult]:
        """Cancel the jobs named and those matching `filter` / `state`, with
        one result per job (in that order): its state after the request, or
        why it was not cancelled (e.g. it had already completed). Needs ids or
        a filter: it never cancels everything by default. Retried after a lost
        answer only when it names jobs by id (a filter would no longer match
        the jobs the lost attempt cancelled, so their results would be missing)."""
        request = proto.bulk_cancel_request(job_ids, filter=filter, state=state, reason=reason, note=note)
        response = self._t.unary(self._t.jobs.BulkCancelJobs, request, kind=proto.bulk_cancel_kind(request))
        return [BulkCancelResult.from_proto(r) for r in response.results]


class Queue:
    """The queue (``QueueService``): ``get``, ``watch``, ``promote``, ``audit``."""

    def __init__(self, transport: SyncTransport, jobs: Jobs) -> None:
        self._t = transport
        self._jobs = jobs

    def get(self) -> QueueSnapshot:
        """Waiting jobs in start order with positions and expected starts,
        running jobs with progress, pools and statistics."""
        request = queue_service_pb2.GetQueueRequest()
        return QueueSnapshot.from_proto(self._t.unary(self._t.queue.GetQueue, request, kind=CallKind.READ))

    def watch(self, *, timeout: float | None = None) -> Iterator[QueueSnapshot]:
        """The queue now, then each time it changes (and every few seconds, as
        expected starts move with time). It never ends by itself: stop
        iterating, or pass `timeout` (seconds) to end quietly then. Reconnects
        after disconnects and server restarts, asking for the current queue
        (the version cursor is per server, so it is not carried over)."""
        stub = self._t.queue

        def open_call(t: float | None, md: Metadata) -> Any:
            return stub.WatchQueue(queue_service_pb2.WatchQueueRequest(), timeout=t, metadata=md)

        for response in self._t.follow(open_call, key_of=_queue_version, deadline=proto.deadline_after(timeout)):
            yield QueueSnapshot.from_proto(response.queue)

    def promote(self, job: str | Job, *, reason: PromotionReason | str, justification: str) -> Promotion:
        """Move a queued job to the front. `reason` is ``"client_deadline"``,
        ``"critical_business_need"``, ``"urgent_fix"`` or ``"manager_override"``;
        `justification` (100 to 500 characters, checked before the call) goes
        to the audit log with who and when. Returns the promoted job (a
        handle), the jobs it delays and by how much, and the audit entry."""
        return proto.bind_promotion(
            self._jobs._promote_proto(proto.job_ref(job), reason, justification), self._jobs._job
        )

    def audit(self, *, page_size: int | None = None, limit: int | None = None) -> Pager[QueueAuditEntry]:
        """The queue's audit log (promotions: who, when, why), newest first."""

        def fetch(token: str) -> Page[QueueAuditEntry]:
            request = queue_service_pb2.ListQueueAuditRequest(page_size=page_size or 0, page_token=token)
            return proto.audit_page(self._t.unary(self._t.queue.ListQueueAudit, request, kind=CallKind.READ))

        return Pager(fetch, limit=limit)


class Projects:
    """The caller's project (``ProjectService``): ``usage``."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def usage(self, *, months: int = 6) -> Usage:
        """GPU hours this month against the quota (with when it resets and
        when it would run out), and spend for the last `months` months
        (at most 36), newest first."""
        request = project_service_pb2.GetUsageRequest(months=months)
        return Usage.from_proto(self._t.unary(self._t.projects.GetUsage, request, kind=CallKind.READ))


class ApiKeys:
    """The API keys of the caller's project (``ApiKeyService``): ``create``,
    ``list``, ``revoke``. Managing keys needs an admin key
    (PermissionDeniedError, ``ROLE_REQUIRED``, otherwise)."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def create(
        self, name: str, *, role: Role | str = Role.MEMBER, ttl: timedelta | float | None = None
    ) -> CreatedApiKey:
        """Create a key for a person or a machine (`name`, 1 to 64 characters,
        becomes the actor recorded on what the key does) with `role`
        (``"viewer"``, ``"member"`` or ``"admin"``), expiring after `ttl`
        (a timedelta or seconds; None: never). The result holds the secret
        (:attr:`CreatedApiKey.secret`): the only time it is shown. Not retried
        after a lost connection (it would make a second key)."""
        request = proto.create_api_key_request(name, role, ttl)
        response = self._t.unary(self._t.api_keys.CreateApiKey, request, kind=CallKind.WRITE)
        return CreatedApiKey.from_proto(response)

    def list(
        self,
        *,
        show_revoked: bool = False,
        page_size: int | None = None,
        page_token: str = "",
        limit: int | None = None,
    ) -> Pager[ApiKey]:
        """The project's keys, newest first, without secrets; revoked ones
        too with `show_revoked`."""

        def fetch(token: str) -> Page[ApiKey]:
            request = proto.list_api_keys_request(show_revoked=show_revoked, page_size=page_size, page_token=token)
            return proto.api_keys_page(self._t.unary(self._t.api_keys.ListApiKeys, request, kind=CallKind.READ))

        return Pager(fetch, page_token=page_token, limit=limit)

    def revoke(self, key: str | ApiKey | CreatedApiKey) -> ApiKey:
        """Revoke a key (by id, model, or its secret: only the id is sent);
        calls with it fail from then on (AuthenticationError, ``revoked``).
        Revoking a revoked key returns it unchanged, so this is safe to retry."""
        request = proto.revoke_api_key_request(key)
        return ApiKey.from_proto(self._t.unary(self._t.api_keys.RevokeApiKey, request, kind=CallKind.IDEMPOTENT))


# ====================================================================== async


class AsyncDatasets:
    """Upload, inspect and delete datasets; the async twin of :class:`Datasets`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def upload(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        format: DatasetFormat | str | None = None,
        request_id: str | None = None,
        progress: ProgressCallback | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float | None = None,  # noqa: ASYNC109 - per-attempt gRPC deadline
    ) -> Dataset:
        """Upload and validate a training file; see :meth:`Datasets.upload`.
        File reads happen in a worker thread, never on the event loop."""
        plan = await asyncio.to_thread(
            proto.plan_upload, path, name=name, format=format, request_id=request_id, chunk_size=chunk_size
        )

        report = proto.Progress(progress)

        async def attempt(t: float | None, md: Metadata) -> Any:
            try:
                return await self._t.datasets.UploadDataset(
                    _async_upload_requests(plan, report), timeout=t, metadata=md
                )
            except (grpc.RpcError, asyncio.CancelledError):
                report.reraise()  # grpc.aio cancels the call when the request iterator raises
                raise

        return Dataset.from_proto(await self._t.invoke(attempt, kind=CallKind.IDEMPOTENT, timeout=timeout))

    async def get(self, dataset_id: str) -> Dataset:
        """One dataset; NotFoundError (``DATASET_NOT_FOUND``) if it does not exist."""
        request = dataset_service_pb2.GetDatasetRequest(dataset_id=proto.resource_id(dataset_id, "dataset"))
        return Dataset.from_proto(await self._t.unary(self._t.datasets.GetDataset, request, kind=CallKind.READ))

    def list(
        self,
        *,
        filter: str | None = None,
        page_size: int | None = None,
        page_token: str = "",
        limit: int | None = None,
    ) -> AsyncPager[Dataset]:
        """Datasets, newest first; ``async for`` over them (see :meth:`Datasets.list`)."""

        async def fetch(token: str) -> Page[Dataset]:
            request = dataset_service_pb2.ListDatasetsRequest(
                filter=filter or "", page_size=page_size or 0, page_token=token
            )
            response = await self._t.unary(self._t.datasets.ListDatasets, request, kind=CallKind.READ)
            return Page(tuple(Dataset.from_proto(d) for d in response.datasets), response.next_page_token)

        return AsyncPager(fetch, page_token=page_token, limit=limit)

    async def delete(self, dataset_id: str) -> None:
        """Delete a dataset; see :meth:`Datasets.delete`."""
        request = dataset_service_pb2.DeleteDatasetRequest(dataset_id=proto.resource_id(dataset_id, "dataset"))
        attempts = 0

        async def attempt(t: float | None, md: Metadata) -> None:
            nonlocal attempts
            attempts += 1
            try:
                await self._t.datasets.DeleteDataset(request, timeout=t, metadata=md)
            except grpc.RpcError as e:
                if attempts > 1 and e.code() == _NOT_FOUND:
                    return
                raise

        await self._t.invoke(attempt, kind=CallKind.IDEMPOTENT)

    async def validate(
        self, dataset_id: str, *, base_model: str | None = None, max_seq_length: int | None = None
    ) -> Dataset:
        """Validate a stored dataset again — with `base_model`'s tokenizer and chat
        template for the token checks, if given — and return it with the results."""
        request = dataset_service_pb2.ValidateDatasetRequest(
            dataset_id=proto.resource_id(dataset_id, "dataset"),
            base_model=base_model or "",
            max_seq_length=max_seq_length or 0,
        )
        return Dataset.from_proto(
            await self._t.unary(self._t.datasets.ValidateDataset, request, kind=CallKind.IDEMPOTENT)
        )

    def list_errors(
        self,
        dataset_id: str,
        *,
        order_by: IssueOrder | str | None = None,
        critical_only: bool = False,
        types: Iterable[str] | None = None,
        include_context: bool = False,
        page_size: int | None = None,
        limit: int | None = None,
    ) -> AsyncPager[DatasetIssue]:
        """The problems the latest validation found, paged: sorted by
        ``"index"`` (default), ``"type"`` or ``"severity"``, optionally only
        critical ones or some error types, with context excerpts if asked.
        Each page's ``total_size`` counts the matches across all pages."""

        async def fetch(token: str) -> Page[DatasetIssue]:
            request = proto.validation_errors_request(
                dataset_id,
                order_by=order_by,
                critical_only=critical_only,
                types=types,
                include_context=include_context,
                page_size=page_size,
                page_token=token,
            )
            return proto.issues_page(
                await self._t.unary(self._t.datasets.ListValidationErrors, request, kind=CallKind.READ)
            )

        return AsyncPager(fetch, limit=limit)

    async def export_errors(
        self, dataset_id: str, *, critical_only: bool = False, order_by: IssueOrder | str | None = None
    ) -> AsyncIterator[bytes]:
        """The problems as CSV (header first), streamed in chunks of UTF-8 bytes."""
        request = dataset_service_pb2.ExportValidationErrorsRequest(
            dataset_id=proto.resource_id(dataset_id, "dataset"),
            critical_only=critical_only,
            order_by=int(IssueOrder.parse(order_by)) if order_by is not None else 0,  # type: ignore[arg-type]
        )
        stub = self._t.datasets
        async for response in self._t.stream_once(
            lambda timeout, md: stub.ExportValidationErrors(request, timeout=timeout, metadata=md)
        ):
            yield response.chunk


async def _async_upload_requests(
    plan: UploadPlan, progress: ProgressCallback | None
) -> AsyncIterator[dataset_service_pb2.UploadDatasetRequest]:
    yield plan.first_request()
    sent = 0
    if progress is not None:
        progress(0, plan.size)
    f = await asyncio.to_thread(plan.path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, plan.chunk_size):
            yield dataset_service_pb2.UploadDatasetRequest(chunk=chunk)
            sent += len(chunk)
            if progress is not None:
                progress(sent, plan.size)
    finally:
        f.close()


class AsyncJobs:
    """Create, inspect, follow and cancel jobs; the async twin of :class:`Jobs`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    def _job(self, message: job_pb2.Job) -> AsyncJob:
        return AsyncJob._bound(message, self)

    async def create(
        self,
        *,
        dataset: str | Dataset,
        base_model: str,
        preset: Preset | str = Preset.BALANCED,
        name: str | None = None,
        gpu_type: str | None = None,
        pricing: PricingTier | str | None = None,
        max_duration: timedelta | float | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        description: str | None = None,
        force: bool = False,
        recovery_policy: RecoveryPolicy | None = None,
        **overrides: Any,
    ) -> AsyncJob:
        """Create a job and queue it; see :meth:`Jobs.create`."""
        request = proto.create_job_request(
            dataset=dataset,
            base_model=base_model,
            preset=preset,
            name=name,
            gpu_type=gpu_type,
            pricing=pricing,
            max_duration=max_duration,
            labels=labels,
            request_id=request_id,
            acknowledge_oom_risk=acknowledge_oom_risk,
            overrides=overrides,
            description=description,
            force=force,
            recovery_policy=recovery_policy,
        )
        return self._job(await self._t.unary(self._t.jobs.CreateJob, request, kind=CallKind.IDEMPOTENT))

    async def estimate(
        self,
        *,
        base_model: str,
        dataset: str | Dataset | None = None,
        preset: Preset | str = Preset.BALANCED,
        gpu_type: str | None = None,
        pricing: PricingTier | str | None = None,
        max_duration: timedelta | float | None = None,
        **overrides: Any,
    ) -> JobEstimate:
        """Estimate a configuration without creating anything; see :meth:`Jobs.estimate`."""
        request = proto.estimate_job_request(
            dataset=dataset,
            base_model=base_model,
            preset=preset,
            gpu_type=gpu_type,
            pricing=pricing,
            max_duration=max_duration,
            overrides=overrides,
        )
        response = await self._t.unary(self._t.jobs.EstimateJob, request, kind=CallKind.READ)
        return JobEstimate.from_proto(response.estimate)

    async def _get_proto(self, job_id: str) -> job_pb2.Job:
        request = job_service_pb2.GetJobRequest(job_id=proto.resource_id(job_id, "job"))
        return await self._t.unary(self._t.jobs.GetJob, request, kind=CallKind.READ)

    async def get(self, job_id: str) -> AsyncJob:
        """One job; NotFoundError (``JOB_NOT_FOUND``) if it does not exist."""
        return self._job(await self._get_proto(job_id))

    def list(
        self,
        *,
        filter: str | None = None,
        state: JobState | str | None = None,
        page_size: int | None = None,
        page_token: str = "",
        limit: int | None = None,
        order_by: str | None = None,
        query: str | None = None,
    ) -> AsyncPager[AsyncJob]:
        """Jobs, newest first; ``async for`` over them (see :meth:`Jobs.list`)."""

        async def fetch(token: str) -> Page[AsyncJob]:
            request = proto.list_jobs_request(
                filter=filter, state=state, page_size=page_size, page_token=token, order_by=order_by, query=query
            )
            response = await self._t.unary(self._t.jobs.ListJobs, request, kind=CallKind.READ)
            return proto.jobs_page(response, self._job)

        return AsyncPager(fetch, page_token=page_token, limit=limit)

    async def _cancel_proto(self, job_id: str, *, reason: CancelReason | str, note: str) -> job_pb2.Job:
        request = proto.cancel_request(proto.resource_id(job_id, "job"), reason, note)
        return await self._t.unary(self._t.jobs.CancelJob, request, kind=CallKind.IDEMPOTENT)

    async def cancel(self, job_id: str, *, reason: CancelReason | str, note: str = "") -> AsyncJob:
        """Ask a job to stop; see :meth:`Jobs.cancel`."""
        return self._job(await self._cancel_proto(job_id, reason=reason, note=note))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the same API as the sync client
        on_decision: OnDecision = "raise",
    ) -> AsyncJob:
        """Wait until the job is terminal and return it; see :meth:`Job.wait`."""
        job = await self.get(job_id)
        return await job.wait(timeout, on_decision=on_decision)

    async def _watch_protos(
        self, job_id: str, *, from_version: int, deadline: float | None
    ) -> AsyncIterator[job_pb2.Job]:
        job_id = proto.resource_id(job_id, "job")
        stub = self._t.jobs

        def open_call(cursor: int, timeout: float | None, md: Metadata) -> Any:
            return stub.WatchJob(
                job_service_pb2.WatchJobRequest(job_id=job_id, from_sequence=cursor), timeout=timeout, metadata=md
            )

        async def check_done(cursor: int) -> tuple[bool, bool]:
            job = await self._get_proto(job_id)
            terminal = JobState(job.state).is_terminal
            return terminal and cursor > job.version, terminal

        async for response in self._t.stream(
            open_call,
            start=from_version,
            sequence_of=_watch_sequence,
            check_done=check_done,
            deadline=deadline,
        ):
            yield response.job

    async def watch(self, job_id: str, *, timeout: float | None = None) -> AsyncIterator[AsyncJob]:  # noqa: ASYNC109 - the same API as the sync client
        """Snapshots of a job each time it changes, until it is terminal."""
        job = await self.get(job_id)
        async for snapshot in job.watch(timeout=timeout):
            yield snapshot

    async def stream_metrics(
        self, job_id: str, *, from_sequence: int = 0, from_step: int | None = None
    ) -> AsyncIterator[MetricPoint]:
        """A job's metric points; see :meth:`Jobs.stream_metrics`."""
        job_id = proto.resource_id(job_id, "job")
        stub = self._t.jobs

        def open_call(cursor: int, timeout: float | None, md: Metadata) -> Any:
            request = job_service_pb2.StreamJobMetricsRequest(job_id=job_id, from_sequence=cursor)
            return stub.StreamJobMetrics(request, timeout=timeout, metadata=md)

        async def check_done(cursor: int) -> tuple[bool, bool]:
            job = await self._get_proto(job_id)
            return proto.metrics_done(job, cursor), JobState(job.state).is_terminal

        async for response in self._t.stream(
            open_call, start=from_sequence, sequence_of=_metric_sequence, check_done=check_done
        ):
            if from_step is None or response.metric.step >= from_step:
                yield MetricPoint.from_proto(response.metric)

    async def stream_events(
        self, job_id: str, *, types: EventTypes = None, from_sequence: int = 0
    ) -> AsyncIterator[JobEvent]:
        """A job's events; see :meth:`Jobs.stream_events`."""
        job_id = proto.resource_id(job_id, "job")
        wanted = frozenset(proto.event_types(types))
        stub = self._t.jobs

        # The stream is opened unfiltered and filtered here: the cursor then sees
        # every sequence number, so "everything arrived" is exact even when the
        # wanted types end before the log does.
        def open_call(cursor: int, timeout: float | None, md: Metadata) -> Any:
            request = job_service_pb2.StreamJobEventsRequest(job_id=job_id, from_sequence=cursor)
            return stub.StreamJobEvents(request, timeout=timeout, metadata=md)

        async def check_done(cursor: int) -> tuple[bool, bool]:
            job = await self._get_proto(job_id)
            return proto.events_done(job, cursor), JobState(job.state).is_terminal

        async for response in self._t.stream(
            open_call, start=from_sequence, sequence_of=_event_sequence, check_done=check_done
        ):
            if not wanted or response.event.type in wanted:
                yield JobEvent.from_proto(response.event)

    def list_metrics(self, job_id: str, *, page_size: int | None = None) -> AsyncPager[MetricPoint]:
        """A job's stored metric points in sequence order, paged."""
        job_id = proto.resource_id(job_id, "job")

        async def fetch(token: str) -> Page[MetricPoint]:
            request = job_service_pb2.ListJobMetricsRequest(job_id=job_id, page_size=page_size or 0, page_token=token)
            response = await self._t.unary(self._t.jobs.ListJobMetrics, request, kind=CallKind.READ)
            return Page(tuple(MetricPoint.from_proto(m) for m in response.metrics), response.next_page_token)

        return AsyncPager(fetch)

    def list_events(
        self,
        job_id: str,
        *,
        query: str | None = None,
        types: EventTypes = None,
        page_size: int | None = None,
    ) -> AsyncPager[JobEvent]:
        """A job's stored events in sequence order, paged."""
        job_id = proto.resource_id(job_id, "job")
        wanted: Any = proto.event_types(types)

        async def fetch(token: str) -> Page[JobEvent]:
            request = job_service_pb2.ListJobEventsRequest(
                job_id=job_id, page_size=page_size or 0, page_token=token, types=wanted, query=query or ""
            )
            response = await self._t.unary(self._t.jobs.ListJobEvents, request, kind=CallKind.READ)
            return Page(tuple(JobEvent.from_proto(e) for e in response.events), response.next_page_token)

        return AsyncPager(fetch)

    # ------------------------------------------------------------ control and recovery

    async def _converge(
        self,
        method: Callable[..., Awaitable[job_pb2.Job]],
        request: Any,
        settled: Callable[[job_pb2.Job], bool],
    ) -> job_pb2.Job:
        """See :meth:`Jobs._converge`."""
        attempts = 0

        async def attempt(t: float | None, md: Metadata) -> job_pb2.Job:
            nonlocal attempts
            attempts += 1
            try:
                return await method(request, timeout=t, metadata=md)
            except grpc.RpcError as e:
                if attempts > 1 and proto.is_state_conflict(e):
                    job = await self._get_proto(request.job_id)
                    if settled(job):
                        return job
                raise

        return await self._t.invoke(attempt, kind=CallKind.IDEMPOTENT)

    async def _pause_proto(self, job_id: str) -> job_pb2.Job:
        request = job_service_pb2.PauseJobRequest(job_id=proto.job_ref(job_id))
        return await self._t.unary(self._t.jobs.PauseJob, request, kind=CallKind.IDEMPOTENT)

    async def pause(self, job_id: str) -> AsyncJob:
        """Checkpoint a training job and stop its worker; see :meth:`Jobs.pause`."""
        return self._job(await self._pause_proto(job_id))

    async def _resume_proto(
        self, job_id: str, *, gpu_type: str | None, pricing: PricingTier | str | None
    ) -> job_pb2.Job:
        request = proto.resume_request(job_id, gpu_type, pricing)
        return await self._converge(self._t.jobs.ResumeJob, request, proto.resumed)

    async def resume(
        self, job_id: str, *, gpu_type: str | None = None, pricing: PricingTier | str | None = None
    ) -> AsyncJob:
        """Queue a paused job again; see :meth:`Jobs.resume`."""
        return self._job(await self._resume_proto(job_id, gpu_type=gpu_type, pricing=pricing))

    async def retry(
        self,
        job_id: str,
        *,
        fixes: FixesArg = None,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        force: bool = False,
    ) -> AsyncJob:
        """Create a new job retrying a failed or cancelled one; see :meth:`Jobs.retry`."""
        request = proto.retry_request(
            job_id, fixes, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
        )
        return self._job(await self._t.unary(self._t.jobs.RetryJob, request, kind=CallKind.IDEMPOTENT))

    async def suggest_fixes(self, job_id: str) -> FixSuggestions:
        """The fixes for a failed job, best first; see :meth:`Jobs.suggest_fixes`."""
        request = job_service_pb2.SuggestFixesRequest(job_id=proto.job_ref(job_id))
        return FixSuggestions.from_proto(await self._t.unary(self._t.jobs.SuggestFixes, request, kind=CallKind.READ))

    async def retry_with_suggested_fix(
        self,
        job_id: str,
        fix: FixesArg = None,
        *,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        force: bool = False,
    ) -> AsyncJob:
        """Retry with a suggested fix; see :meth:`Jobs.retry_with_suggested_fix`."""
        if fix is None:
            suggestions = await self.suggest_fixes(job_id)
            fix = suggestions.top
            if fix is None:
                raise proto.no_applicable_fix(suggestions, await self.get(job_id))
        return await self.retry(
            job_id, fixes=fix, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
        )

    async def resume_from_checkpoint(
        self,
        job_id: str,
        checkpoint: str | Checkpoint | None = None,
        *,
        lr_schedule: LrScheduleMode | str = LrScheduleMode.CONTINUE,
        gpu_type: str | None = None,
        pricing: PricingTier | str | None = None,
        request_id: str | None = None,
        force: bool = False,
        **changes: Any,
    ) -> AsyncJob:
        """Create a continuation job; see :meth:`Jobs.resume_from_checkpoint`."""
        request = proto.resume_from_checkpoint_request(
            job_id,
            checkpoint,
            lr_schedule=lr_schedule,
            gpu_type=gpu_type,
            pricing=pricing,
            request_id=request_id,
            changes=changes,
            force=force,
        )
        return self._job(await self._t.unary(self._t.jobs.ResumeFromCheckpoint, request, kind=CallKind.IDEMPOTENT))

    async def failure_report(self, job_id: str) -> FailureReport:
        """The audit trail of a failed job; see :meth:`Jobs.failure_report`."""
        request = job_service_pb2.GetFailureReportRequest(job_id=proto.job_ref(job_id))
        return FailureReport.from_proto(await self._t.unary(self._t.jobs.GetFailureReport, request, kind=CallKind.READ))

    async def _decide_proto(self, job_id: str, choice: RecoveryChoice | str) -> job_pb2.Job:
        return await self._converge(self._t.jobs.DecideRecovery, proto.decide_request(job_id, choice), proto.decided)

    async def decide(self, job_id: str, choice: RecoveryChoice | str) -> AsyncJob:
        """Choose how a job awaiting a decision continues; see :meth:`Jobs.decide`."""
        return self._job(await self._decide_proto(job_id, choice))

    async def list_checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        """A job's complete checkpoints, newest first."""
        request = job_service_pb2.ListJobCheckpointsRequest(job_id=proto.job_ref(job_id))
        return proto.checkpoints_of(await self._t.unary(self._t.jobs.ListJobCheckpoints, request, kind=CallKind.READ))

    async def _on_demand_proto(self, job_id: str) -> job_pb2.Job:
        request = job_service_pb2.SwitchToOnDemandRequest(job_id=proto.job_ref(job_id))
        return await self._t.unary(self._t.jobs.SwitchToOnDemand, request, kind=CallKind.IDEMPOTENT)

    async def switch_to_on_demand(self, job_id: str) -> AsyncJob:
        """Move a job to on-demand capacity; see :meth:`Jobs.switch_to_on_demand`."""
        return self._job(await self._on_demand_proto(job_id))

    async def _promote_proto(
        self, job_id: str, reason: PromotionReason | str, justification: str
    ) -> queue_service_pb2.PromoteJobResponse:
        request = proto.promote_request(job_id, reason, justification)
        return await self._t.unary(self._t.queue.PromoteJob, request, kind=CallKind.WRITE)

    # ------------------------------------------------------------ many jobs

    async def iter_export(
        self,
        *,
        filter: str | None = None,
        state: JobState | str | None = None,
        query: str | None = None,
        order_by: str | None = None,
    ) -> AsyncIterator[bytes]:
        """The matching jobs as CSV chunks; see :meth:`Jobs.iter_export`."""
        request = proto.export_request(filter=filter, state=state, query=query, order_by=order_by)
        stub = self._t.jobs
        async for response in self._t.stream_once(
            lambda timeout, md: stub.ExportJobs(request, timeout=timeout, metadata=md)
        ):
            yield response.chunk

    async def export(
        self,
        dest: ExportTarget,
        *,
        filter: str | None = None,
        state: JobState | str | None = None,
        query: str | None = None,
        order_by: str | None = None,
    ) -> int:
        """Write the matching jobs as CSV to `dest`; see :meth:`Jobs.export`.
        File writes happen in a worker thread."""
        sink = proto.ExportSink(dest)
        await asyncio.to_thread(sink.open)
        try:
            async for chunk in self.iter_export(filter=filter, state=state, query=query, order_by=order_by):
                await asyncio.to_thread(sink.write, chunk)
        except BaseException:
            await asyncio.to_thread(sink.abort)
            raise
        await asyncio.to_thread(sink.commit)
        return sink.written

    async def bulk_cancel(
        self,
        job_ids: Iterable[str | AsyncJob] | None = None,
        *,
        filter: str | None = None,
        state: JobState | str | None = None,
        reason: CancelReason | str,
        note: str = "",
    ) -> builtins.list[BulkCancelResult]:
        """Cancel many jobs; see :meth:`Jobs.bulk_cancel`."""
        request = proto.bulk_cancel_request(job_ids, filter=filter, state=state, reason=reason, note=note)
        response = await self._t.unary(self._t.jobs.BulkCancelJobs, request, kind=proto.bulk_cancel_kind(request))
        return [BulkCancelResult.from_proto(r) for r in response.results]


class AsyncQueue:
    """The queue; the async twin of :class:`Queue`."""

    def __init__(self, transport: AsyncTransport, jobs: AsyncJobs) -> None:
        self._t = transport
        self._jobs = jobs

    async def get(self) -> QueueSnapshot:
        """The queue now; see :meth:`Queue.get`."""
        request = queue_service_pb2.GetQueueRequest()
        return QueueSnapshot.from_proto(await self._t.unary(self._t.queue.GetQueue, request, kind=CallKind.READ))

    async def watch(self, *, timeout: float | None = None) -> AsyncIterator[QueueSnapshot]:  # noqa: ASYNC109 - the same API as the sync client
        """The queue now, then each time it changes; see :meth:`Queue.watch`."""
        stub = self._t.queue

        def open_call(t: float | None, md: Metadata) -> Any:
            return stub.WatchQueue(queue_service_pb2.WatchQueueRequest(), timeout=t, metadata=md)

        async for response in self._t.follow(open_call, key_of=_queue_version, deadline=proto.deadline_after(timeout)):
            yield QueueSnapshot.from_proto(response.queue)

    async def promote(self, job: str | AsyncJob, *, reason: PromotionReason | str, justification: str) -> Promotion:
        """Move a queued job to the front; see :meth:`Queue.promote`."""
        response = await self._jobs._promote_proto(proto.job_ref(job), reason, justification)
        return proto.bind_promotion(response, self._jobs._job)

    def audit(self, *, page_size: int | None = None, limit: int | None = None) -> AsyncPager[QueueAuditEntry]:
        """The queue's audit log, newest first; ``async for`` over it."""

        async def fetch(token: str) -> Page[QueueAuditEntry]:
            request = queue_service_pb2.ListQueueAuditRequest(page_size=page_size or 0, page_token=token)
            return proto.audit_page(await self._t.unary(self._t.queue.ListQueueAudit, request, kind=CallKind.READ))

        return AsyncPager(fetch, limit=limit)


class AsyncProjects:
    """The caller's project; the async twin of :class:`Projects`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def usage(self, *, months: int = 6) -> Usage:
        """GPU hours against the quota and spend per month; see :meth:`Projects.usage`."""
        request = project_service_pb2.GetUsageRequest(months=months)
        return Usage.from_proto(await self._t.unary(self._t.projects.GetUsage, request, kind=CallKind.READ))


class AsyncApiKeys:
    """The API keys of the caller's project; the async twin of :class:`ApiKeys`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self, name: str, *, role: Role | str = Role.MEMBER, ttl: timedelta | float | None = None
    ) -> CreatedApiKey:
        """Create a key and return it with its secret; see :meth:`ApiKeys.create`."""
        request = proto.create_api_key_request(name, role, ttl)
        response = await self._t.unary(self._t.api_keys.CreateApiKey, request, kind=CallKind.WRITE)
        return CreatedApiKey.from_proto(response)

    def list(
        self,
        *,
        show_revoked: bool = False,
        page_size: int | None = None,
        page_token: str = "",
        limit: int | None = None,
    ) -> AsyncPager[ApiKey]:
        """The project's keys, newest first; ``async for`` over it."""

        async def fetch(token: str) -> Page[ApiKey]:
            request = proto.list_api_keys_request(show_revoked=show_revoked, page_size=page_size, page_token=token)
            response = await self._t.unary(self._t.api_keys.ListApiKeys, request, kind=CallKind.READ)
            return proto.api_keys_page(response)

        return AsyncPager(fetch, page_token=page_token, limit=limit)

    async def revoke(self, key: str | ApiKey | CreatedApiKey) -> ApiKey:
        """Revoke a key; see :meth:`ApiKeys.revoke`."""
        request = proto.revoke_api_key_request(key)
        response = await self._t.unary(self._t.api_keys.RevokeApiKey, request, kind=CallKind.IDEMPOTENT)
        return ApiKey.from_proto(response)
