"""gRPC servicers: translate requests, call the services, translate results.

No business logic lives here; errors raised by the services are mapped to
statuses by the ErrorInterceptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from brightrun.v1 import (
    api_key_service_pb2,
    api_key_service_pb2_grpc,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    project_service_pb2,
    project_service_pb2_grpc,
    queue_service_pb2,
    queue_service_pb2_grpc,
    trainer_service_pb2,
    trainer_service_pb2_grpc,
)
from brightrun_server.api import convert
from brightrun_server.api.feeds import FeedHub, wait_for
from brightrun_server.domain import caller
from brightrun_server.domain.caller import Role
from brightrun_server.domain.errors import FieldViolation, InvalidArgument
from brightrun_server.domain.pricing import PricingTier
from brightrun_server.domain.recovery import Choice
from brightrun_server.domain.states import TERMINAL, JobState
from brightrun_server.services.datasets import DatasetService
from brightrun_server.services.jobs import JobService
from brightrun_server.services.keys import ApiKeys
from brightrun_server.services.queue import QueueService
from brightrun_server.services.recovery import RecoveryService, ResumeInput
from brightrun_trainer.spec import ATTEMPT_TOKEN_METADATA

Context = aio.ServicerContext[Any, Any]

#: Seconds a stream waits for a change before re-checking the database (which
#: catches changes made by another replica).
POLL_SECONDS = 1.0
BATCH = 500
#: Shortest interval between two queue snapshots sent to a watcher.
QUEUE_MIN_INTERVAL = 0.5


def _require_id(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument([FieldViolation(field, "required")])
    return value


def _from_sequence(value: int) -> int:
    if value < 0:
        raise InvalidArgument([FieldViolation("from_sequence", f"must be 0 or more, got {value}")])
    return max(1, value)


class DatasetServicer(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(self, datasets: DatasetService) -> None:
        self._datasets = datasets

    async def UploadDataset(
        self,
        request_iterator: AsyncIterator[dataset_service_pb2.UploadDatasetRequest],
        context: Context,
    ) -> dataset_pb2.Dataset:
        stream = aiter(request_iterator)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise InvalidArgument([FieldViolation("metadata", "the upload stream was empty")]) from None
        if first.WhichOneof("payload") != "metadata":
            raise InvalidArgument([FieldViolation("metadata", "the first message must carry the metadata")])

        async def chunks() -> AsyncIterator[bytes]:
            async for message in stream:
                if message.WhichOneof("payload") == "metadata":
                    raise InvalidArgument([FieldViolation("metadata", "only the first message may carry metadata")])
                yield message.chunk

        row = await self._datasets.upload(convert.upload_metadata(first.metadata), chunks())
        return convert.dataset(row)

    async def GetDataset(self, request: dataset_service_pb2.GetDatasetRequest, context: Context) -> dataset_pb2.Dataset:
        return convert.dataset(await self._datasets.get(_require_id(request.dataset_id, "dataset_id")))

    async def ListDatasets(
        self, request: dataset_service_pb2.ListDatasetsRequest, context: Context
    ) -> dataset_service_pb2.ListDatasetsResponse:
        rows, token = await self._datasets.list_datasets(
            size=request.page_size, token=request.page_token, filter_text=request.filter
        )
        return dataset_service_pb2.ListDatasetsResponse(
            datasets=[convert.dataset(r) for r in rows], next_page_token=token
        )

    async def DeleteDataset(
        self, request: dataset_service_pb2.DeleteDatasetRequest, context: Context
    ) -> dataset_service_pb2.DeleteDatasetResponse:
        await self._datasets.delete(_require_id(request.dataset_id, "dataset_id"))
        return dataset_service_pb2.DeleteDatasetResponse(dataset_id=request.dataset_id)

    async def ValidateDataset(
        self, request: dataset_service_pb2.ValidateDatasetRequest, context: Context
    ) -> dataset_pb2.Dataset:
        row = await self._datasets.validate(
            _require_id(request.dataset_id, "dataset_id"),
            base_model=request.base_model,
            max_seq_length=request.max_seq_length,
        )
        return convert.dataset(row)

    async def ListValidationErrors(
        self, request: dataset_service_pb2.ListValidationErrorsRequest, context: Context
    ) -> dataset_service_pb2.ListValidationErrorsResponse:
        page, token, total = await self._datasets.list_issues(
            _require_id(request.dataset_id, "dataset_id"),
            size=request.page_size,
            token=request.page_token,
            order=convert.issue_order(request.order_by),
            critical_only=request.critical_only,
            types=list(request.types),
            include_context=request.include_context,
        )
        return dataset_service_pb2.ListValidationErrorsResponse(
            issues=[convert.validation_issue(issue, excerpt) for issue, excerpt in page],
            next_page_token=token,
            total_size=total,
        )

    async def ExportValidationErrors(
        self, request: dataset_service_pb2.ExportValidationErrorsRequest, context: Context
    ) -> AsyncIterator[dataset_service_pb2.ExportValidationErrorsResponse]:
        chunks = self._datasets.export_issues(
            _require_id(request.dataset_id, "dataset_id"),
            critical_only=request.critical_only,
            order=convert.issue_order(request.order_by),
        )
        async for chunk in chunks:
            yield dataset_service_pb2.ExportValidationErrorsResponse(chunk=chunk)


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: JobService, recovery: RecoveryService, queue: QueueService, hub: FeedHub) -> None:
        self._jobs = jobs
        self._recovery = recovery
        self._queue = queue
        self._hub = hub

    async def CreateJob(self, request: job_service_pb2.CreateJobRequest, context: Context) -> job_pb2.Job:
        return convert.job(await self._jobs.create(convert.create_input(request)))

    async def GetJob(self, request: job_service_pb2.GetJobRequest, context: Context) -> job_pb2.Job:
        row = await self._jobs.get(_require_id(request.job_id, "job_id"))
        position = await self._queue.position(row)
        return convert.job(row, chain_spend=await self._jobs.chain_spend(row), queue=position)

    async def ListJobs(
        self, request: job_service_pb2.ListJobsRequest, context: Context
    ) -> job_service_pb2.ListJobsResponse:
        rows, token = await self._jobs.list_jobs(
            size=request.page_size,
            token=request.page_token,
            filter_text=request.filter,
            query_text=request.query,
            order_by=request.order_by,
        )
        return job_service_pb2.ListJobsResponse(jobs=[convert.job(r) for r in rows], next_page_token=token)

    async def CancelJob(self, request: job_service_pb2.CancelJobRequest, context: Context) -> job_pb2.Job:
        reason = convert.enum_name(job_pb2.CancelReason, request.reason, "CANCEL_REASON_")
        row = await self._jobs.cancel(_require_id(request.job_id, "job_id"), reason, request.note)
        return convert.job(row)

    async def ListJobMetrics(
        self, request: job_service_pb2.ListJobMetricsRequest, context: Context
    ) -> job_service_pb2.ListJobMetricsResponse:
        rows, token = await self._jobs.list_metrics(
            _require_id(request.job_id, "job_id"), size=request.page_size, token=request.page_token
        )
        return job_service_pb2.ListJobMetricsResponse(metrics=[convert.metric(r) for r in rows], next_page_token=token)

    async def ListJobEvents(
        self, request: job_service_pb2.ListJobEventsRequest, context: Context
    ) -> job_service_pb2.ListJobEventsResponse:
        rows, token = await self._jobs.list_events(
            _require_id(request.job_id, "job_id"),
            size=request.page_size,
            token=request.page_token,
            types=convert.event_types(request.types),
            query=request.query,
        )
        return job_service_pb2.ListJobEventsResponse(events=[convert.event(r) for r in rows], next_page_token=token)

    async def EstimateJob(
        self, request: job_service_pb2.EstimateJobRequest, context: Context
    ) -> job_service_pb2.EstimateJobResponse:
        document = await self._jobs.estimate(convert.estimate_input(request))
        return job_service_pb2.EstimateJobResponse(estimate=convert.estimate(document))

    async def PauseJob(self, request: job_service_pb2.PauseJobRequest, context: Context) -> job_pb2.Job:
        return convert.job(await self._recovery.pause(_require_id(request.job_id, "job_id")))

    async def ResumeJob(self, request: job_service_pb2.ResumeJobRequest, context: Context) -> job_pb2.Job:
        tier = convert.enum_name(job_pb2.PricingTier, request.compute.pricing_tier, "PRICING_TIER_")
        row = await self._recovery.resume(
            _require_id(request.job_id, "job_id"),
            gpu_type=request.compute.gpu_type,
            pricing_tier=PricingTier(tier) if tier else None,
        )
        return convert.job(row)

    async def RetryJob(self, request: job_service_pb2.RetryJobRequest, context: Context) -> job_pb2.Job:
        row = await self._recovery.retry(
            _require_id(request.job_id, "job_id"),
            request_id=request.request_id,
            fix_ids=list(request.fix_ids),
            acknowledge_oom_risk=request.acknowledge_oom_risk,
            force=request.force,
        )
        return convert.job(row)

    async def SuggestFixes(
        self, request: job_service_pb2.SuggestFixesRequest, context: Context
    ) -> job_service_pb2.SuggestFixesResponse:
        cls, fixes = await self._recovery.suggest(_require_id(request.job_id, "job_id"))
        return job_service_pb2.SuggestFixesResponse(
            failure_class=convert.enum_value(job_pb2.FailureClass, cls.value, "FAILURE_CLASS_"),
            fixes=[convert.recovery_fix(f) for f in fixes],
        )

    async def ResumeFromCheckpoint(
        self, request: job_service_pb2.ResumeFromCheckpointRequest, context: Context
    ) -> job_pb2.Job:
        tier = convert.enum_name(job_pb2.PricingTier, request.compute.pricing_tier, "PRICING_TIER_")
        mode = convert.enum_name(job_pb2.LrScheduleMode, request.lr_schedule, "LR_SCHEDULE_MODE_") or "continue"
        row = await self._recovery.resume_from_checkpoint(
            ResumeInput(
                job_id=_require_id(request.job_id, "job_id"),
                checkpoint_id=request.checkpoint_id,
                request_id=request.request_id,
                changes=convert.overrides(request.changes, "changes"),
                gpu_type=request.compute.gpu_type,
                pricing_tier=PricingTier(tier) if tier else None,
                lr_schedule_mode=mode,
                force=request.force,
            )
        )
        return convert.job(row)

    async def GetFailureReport(
        self, request: job_service_pb2.GetFailureReportRequest, context: Context
    ) -> job_service_pb2.FailureReport:
        return convert.failure_report(await self._recovery.failure_report(_require_id(request.job_id, "job_id")))

    async def DecideRecovery(self, request: job_service_pb2.DecideRecoveryRequest, context: Context) -> job_pb2.Job:
        name = convert.enum_name(job_pb2.RecoveryChoice, request.choice, "RECOVERY_CHOICE_")
        if not name:
            raise InvalidArgument([FieldViolation("choice", "required: KEEP_TRYING, SWITCH_TO_ON_DEMAND or CANCEL")])
        return convert.job(await self._recovery.decide(_require_id(request.job_id, "job_id"), Choice(name)))

    async def ListJobCheckpoints(
        self, request: job_service_pb2.ListJobCheckpointsRequest, context: Context
    ) -> job_service_pb2.ListJobCheckpointsResponse:
        rows = await self._recovery.checkpoints(_require_id(request.job_id, "job_id"))
        return job_service_pb2.ListJobCheckpointsResponse(checkpoints=[convert.checkpoint(r) for r in rows])

    async def SwitchToOnDemand(self, request: job_service_pb2.SwitchToOnDemandRequest, context: Context) -> job_pb2.Job:
        return convert.job(await self._jobs.switch_to_on_demand(_require_id(request.job_id, "job_id")))

    async def ExportJobs(
        self, request: job_service_pb2.ExportJobsRequest, context: Context
    ) -> AsyncIterator[job_service_pb2.ExportJobsResponse]:
        chunks = self._jobs.export_jobs(filter_text=request.filter, query_text=request.query, order_by=request.order_by)
        async for chunk in chunks:
            yield job_service_pb2.ExportJobsResponse(chunk=chunk)

    async def BulkCancelJobs(
        self, request: job_service_pb2.BulkCancelJobsRequest, context: Context
    ) -> job_service_pb2.BulkCancelJobsResponse:
        reason = convert.enum_name(job_pb2.CancelReason, request.reason, "CANCEL_REASON_")
        results = await self._jobs.bulk_cancel(
            job_ids=list(request.job_ids), filter_text=request.filter, reason=reason, note=request.note
        )
        return job_service_pb2.BulkCancelJobsResponse(
            results=[
                job_service_pb2.BulkCancelResult(
                    job_id=job_id,
                    state=convert.enum_value(job_pb2.Job.State, row.state if row else "", "STATE_"),
                    error=error,
                )
                for job_id, row, error in results
            ]
        )

    async def _terminal_after(self, job_id: str, cursor: int, attr: str) -> bool:
        """True when the job is terminal and nothing at or after `cursor` remains."""
        job = self._hub.job(job_id) or await self._jobs.get(job_id)
        return JobState(job.state) in TERMINAL and cursor > int(getattr(job, attr))

    async def StreamJobMetrics(
        self, request: job_service_pb2.StreamJobMetricsRequest, context: Context
    ) -> AsyncIterator[job_service_pb2.StreamJobMetricsResponse]:
        job_id = _require_id(request.job_id, "job_id")
        cursor = _from_sequence(request.from_sequence)
        await self._jobs.get(job_id)
        with self._hub.subscription(job_id):
            await context.send_initial_metadata(())  # the subscription is established
            while True:
                self._hub.check_open()
                signal = self._hub.signal(job_id)
                batch = self._hub.metrics_from(job_id, cursor, BATCH)
                if batch is None:
                    rows = await self._jobs.metrics_after(job_id, cursor - 1, BATCH)
                    batch = [job_service_pb2.StreamJobMetricsResponse(metric=convert.metric(r)) for r in rows]
                if batch:
                    for message in batch:
                        yield message
                    cursor = batch[-1].metric.sequence + 1
                    continue
                if await self._terminal_after(job_id, cursor, "last_metric_seq"):
                    return
                await wait_for(signal, POLL_SECONDS)

    async def StreamJobEvents(
        self, request: job_service_pb2.StreamJobEventsRequest, context: Context
    ) -> AsyncIterator[job_service_pb2.StreamJobEventsResponse]:
        job_id = _require_id(request.job_id, "job_id")
        cursor = _from_sequence(request.from_sequence)
        wanted = set(request.types)
        await self._jobs.get(job_id)
        with self._hub.subscription(job_id):
            await context.send_initial_metadata(())  # the subscription is established
            while True:
                self._hub.check_open()
                signal = self._hub.signal(job_id)
                batch = self._hub.events_from(job_id, cursor, BATCH)
                if batch is None:
                    rows = await self._jobs.events_after(job_id, cursor - 1, BATCH)
                    batch = [job_service_pb2.StreamJobEventsResponse(event=convert.event(r)) for r in rows]
                if batch:
                    for message in batch:
                        if not wanted or message.event.type in wanted:
                            yield message
                    cursor = batch[-1].event.sequence + 1
                    continue
                if await self._terminal_after(job_id, cursor, "last_event_seq"):
                    return
                await wait_for(signal, POLL_SECONDS)

    async def WatchJob(
        self, request: job_service_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[job_service_pb2.WatchJobResponse]:
        job_id = _require_id(request.job_id, "job_id")
        if request.from_sequence < 0:
            raise InvalidArgument([FieldViolation("from_sequence", "must be 0 or more")])
        sent = request.from_sequence - 1
        job = await self._jobs.get(job_id)
        with self._hub.subscription(job_id):
            await context.send_initial_metadata(())  # the subscription is established
            while True:
                self._hub.check_open()
                signal = self._hub.signal(job_id)
                cached = self._hub.job(job_id)
                if cached is not None and cached.version >= job.version:
                    job = cached
                if job.version > sent:
                    yield job_service_pb2.WatchJobResponse(job=convert.job(job))
                    sent = job.version
                if JobState(job.state) in TERMINAL:
                    return
                await wait_for(signal, POLL_SECONDS)
                if not signal.is_set():
                    job = await self._jobs.get(job_id)


class TrainerServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    def __init__(self, jobs: JobService) -> None:
        self._jobs = jobs

    async def ReportAttempt(
        self, request: trainer_service_pb2.ReportAttemptRequest, context: Context
    ) -> trainer_service_pb2.ReportAttemptResponse:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == ATTEMPT_TOKEN_METADATA and isinstance(value, str):
                token = value
        acked, stop = await self._jobs.ingest(
            _require_id(request.attempt_id, "attempt_id"),
            [convert.report(r, f"reports[{i}]") for i, r in enumerate(request.reports)],
            token=token,
        )
        return trainer_service_pb2.ReportAttemptResponse(
            acknowledged_sequence=acked,
            directive=trainer_service_pb2.DIRECTIVE_STOP if stop else trainer_service_pb2.DIRECTIVE_CONTINUE,
        )


class QueueServicer(queue_service_pb2_grpc.QueueServiceServicer):
    def __init__(self, queue: QueueService, hub: FeedHub) -> None:
        self._queue = queue
        self._hub = hub

    async def GetQueue(self, request: queue_service_pb2.GetQueueRequest, context: Context) -> queue_service_pb2.Queue:
        return convert.queue(await self._queue.snapshot(), self._hub.queue_version)

    async def WatchQueue(
        self, request: queue_service_pb2.WatchQueueRequest, context: Context
    ) -> AsyncIterator[queue_service_pb2.WatchQueueResponse]:
        if request.from_sequence < 0:
            raise InvalidArgument([FieldViolation("from_sequence", "must be 0 or more")])
        await context.send_initial_metadata(())
        sent = request.from_sequence - 1
        while True:
            self._hub.check_open()
            signal = self._hub.queue_signal()
            version = self._hub.queue_version
            if version > sent:
                yield queue_service_pb2.WatchQueueResponse(queue=convert.queue(await self._queue.snapshot(), version))
                sent = version
                await asyncio.sleep(QUEUE_MIN_INTERVAL)  # coalesce bursts of changes
            await wait_for(signal, POLL_SECONDS * 5)
            if not signal.is_set():
                self._hub.bump_queue()  # periodic refresh: estimated starts move with time

    async def PromoteJob(
        self, request: queue_service_pb2.PromoteJobRequest, context: Context
    ) -> queue_service_pb2.PromoteJobResponse:
        reason = convert.enum_name(queue_service_pb2.PromotionReason, request.reason, "PROMOTION_REASON_")
        result = await self._queue.promote(_require_id(request.job_id, "job_id"), reason, request.justification)
        return queue_service_pb2.PromoteJobResponse(
            job=convert.job(result.job),
            delayed=[
                queue_service_pb2.QueueDelay(job_id=job_id, delay=convert.duration(delay))
                for job_id, delay in result.delayed.items()
            ],
            audit=convert.audit_entry(result.audit) if result.audit else None,
        )

    async def ListQueueAudit(
        self, request: queue_service_pb2.ListQueueAuditRequest, context: Context
    ) -> queue_service_pb2.ListQueueAuditResponse:
        rows, token = await self._queue.audit(size=request.page_size, token=request.page_token)
        return queue_service_pb2.ListQueueAuditResponse(
            entries=[convert.audit_entry(r) for r in rows], next_page_token=token
        )


class ProjectServicer(project_service_pb2_grpc.ProjectServiceServicer):
    def __init__(self, queue: QueueService) -> None:
        self._queue = queue

    async def GetUsage(
        self, request: project_service_pb2.GetUsageRequest, context: Context
    ) -> project_service_pb2.Usage:
        return convert.usage(await self._queue.usage(request.months))


class ApiKeyServicer(api_key_service_pb2_grpc.ApiKeyServiceServicer):
    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def CreateApiKey(
        self, request: api_key_service_pb2.CreateApiKeyRequest, context: Context
    ) -> api_key_service_pb2.CreateApiKeyResponse:
        role = convert.enum_name(api_key_service_pb2.Role, request.role, "ROLE_")
        if request.role and not role:
            raise InvalidArgument([FieldViolation("role", "must be ROLE_VIEWER, ROLE_MEMBER or ROLE_ADMIN")])
        ttl = convert.timedelta_of(request.ttl, "ttl") if request.HasField("ttl") else None
        row, secret = await self._keys.create(name=request.name, role=Role(role) if role else None, ttl=ttl)
        return api_key_service_pb2.CreateApiKeyResponse(api_key=convert.api_key(row), secret=secret)

    async def ListApiKeys(
        self, request: api_key_service_pb2.ListApiKeysRequest, context: Context
    ) -> api_key_service_pb2.ListApiKeysResponse:
        rows, token = await self._keys.list(
            size=request.page_size, token=request.page_token, show_revoked=request.show_revoked
        )
        return api_key_service_pb2.ListApiKeysResponse(
            api_keys=[convert.api_key(r) for r in rows], next_page_token=token
        )

    async def RevokeApiKey(
        self, request: api_key_service_pb2.RevokeApiKeyRequest, context: Context
    ) -> api_key_service_pb2.ApiKey:
        return convert.api_key(await self._keys.revoke(request.api_key_id))

    async def GetCaller(
        self, request: api_key_service_pb2.GetCallerRequest, context: Context
    ) -> api_key_service_pb2.GetCallerResponse:
        who = caller.current()
        return api_key_service_pb2.GetCallerResponse(
            project=who.project,
            role=convert.enum_value(api_key_service_pb2.Role, who.role.value, "ROLE_"),
            api_key=convert.api_key(await self._keys.get(who.key_id)),
        )
