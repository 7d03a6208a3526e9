"""Job handles: a job's data plus the calls that act on it.

``client.jobs.create(...)`` / ``get(...)`` return a :class:`Job` (an
:class:`AsyncJob` from :class:`~brightrun.AsyncClient`), in the style of
temporalio's ``WorkflowHandle``:

>>> job = client.jobs.create(dataset=ds, base_model="meta-llama/Llama-3.2-1B")
>>> for point in job.stream_metrics():       # live, resumes after disconnects
...     print(point.step, point.train_loss)
>>> job.wait(timeout=3600).raise_for_status()
>>> job.output.adapter_path

A handle's fields are read-only; ``reload()``, ``wait()`` and the calls that
change the job itself (``cancel()``, ``pause()``, ``resume()``, ``decide()``,
``switch_to_on_demand()``) refresh them in place. ``retry()``,
``retry_with_suggested_fix()`` and ``resume_from_checkpoint()`` create a new
job and return its handle.

Failures and recovery:

>>> job.wait()                                   # raises JobNeedsDecision if recovery gave up
>>> if job.state is JobState.FAILED:
...     print(job.failure_report().actions)
...     retry = job.retry_with_suggested_fix()   # the best fix a retry can apply
...     # or: job.resume_from_checkpoint(batch_size=4, lr_schedule="restart_warmup")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Self

from pydantic import PrivateAttr

from brightrun._protocol import FixesArg, OnDecision, bind_promotion, check_on_decision, deadline_after, remaining
from brightrun.enums import (
    CancelReason,
    EventType,
    JobState,
    LrScheduleMode,
    PricingTier,
    PromotionReason,
    RecoveryChoice,
)
from brightrun.errors import DeadlineExceededError, JobCancelledError, JobFailedError, JobNeedsDecision, WaitTimeout
from brightrun.pagination import AsyncPager, Pager
from brightrun.types import Checkpoint, FailureReport, FixSuggestions, JobBase, JobEvent, MetricPoint, Promotion
from brightrun.v1 import job_pb2

if TYPE_CHECKING:
    from brightrun.resources import AsyncJobs, Jobs

__all__ = ["AsyncJob", "Job"]

EventTypes = Iterable[EventType | str | int] | EventType | str | None


def _raise_for_status(job: JobBase) -> None:
    if job.state is JobState.FAILED:
        failure = job.failure
        reason = (failure.reason or failure.message) if failure else job.state_message
        cls = failure.failure_class.name.lower() if failure else "unknown"
        raise JobFailedError(f"job {job.id} failed ({cls}): {reason}", job=job)
    if job.state is JobState.CANCELLED:
        why = ""
        if job.cancellation is not None:
            why = f": {job.cancellation.reason}" + (f" ({job.cancellation.note})" if job.cancellation.note else "")
        raise JobCancelledError(f"job {job.id} was cancelled{why}", job=job)


def _needs_decision(job: JobBase) -> JobNeedsDecision:
    d = job.decision
    choices = ", ".join(f'"{c}"' for c in d.choices) if d is not None and d.choices else "none offered"
    reason = (d.reason if d is not None else "") or job.state_message
    return JobNeedsDecision(
        f"job {job.id} awaits a decision: {reason}; choose with job.decide(...): {choices}", job=job
    )


def _stop_waiting(job: JobBase, on_decision: OnDecision) -> bool:
    """Whether ``wait()`` ends at this snapshot; raises JobNeedsDecision when asked to."""
    if job.state.is_terminal:
        return True
    if job.state is JobState.AWAITING_DECISION and on_decision != "wait":
        if on_decision == "raise":
            raise _needs_decision(job)
        return True
    return False


def _timeout_error(job: JobBase, timeout: float | None) -> WaitTimeout:
    return WaitTimeout(
        f"job {job.id} is still {job.state} after waiting {timeout:g}s"
        if timeout is not None
        else f"job {job.id} did not finish",
        job=job,
        timeout=timeout,
    )


class Job(JobBase):
    """A job, bound to the :class:`~brightrun.Client` that fetched it."""

    _jobs: Jobs | None = PrivateAttr(default=None)

    @classmethod
    def _bound(cls, message: job_pb2.Job, jobs: Jobs) -> Job:
        job = cls.from_proto(message)
        job._jobs = jobs
        return job

    @property
    def _api(self) -> Jobs:
        if self._jobs is None:
            raise RuntimeError("this Job is not bound to a client; get it with client.jobs.get(job_id)")
        return self._jobs

    def reload(self) -> Self:
        """Fetch the job again and update this handle in place."""
        self._replace_from_proto(self._api._get_proto(self.id))
        return self

    def wait(self, timeout: float | None = None, *, on_decision: OnDecision = "raise") -> Self:
        """Block until the job is terminal; return it (updated in place).

        Does not raise when the job failed or was cancelled — call
        :meth:`raise_for_status` for that. Follows the job with WatchJob and
        reconnects after disconnects. Raises :class:`~brightrun.WaitTimeout`
        (carrying the last state seen) when `timeout` seconds pass first.

        Waiting continues through QUEUED, RECOVERING (automatic recovery runs
        by itself) and PAUSED (someone resumes it). A job AWAITING_DECISION
        waits for a user too, but nobody may be watching, so by default this
        raises :class:`~brightrun.JobNeedsDecision` (with the job and its
        ``choices``) instead of blocking silently; answer with
        :meth:`decide` and wait again. `on_decision="return"` returns the job
        in that state instead, and ``"wait"`` keeps waiting for someone else
        to decide.
        """
        check_on_decision(on_decision)
        if self.is_terminal:  # final; any other state may be stale, so watch
            return self
        deadline = deadline_after(timeout)
        try:
            for message in self._api._watch_protos(self.id, from_version=0, deadline=deadline):
                self._replace_from_proto(message)
                if _stop_waiting(self, on_decision):
                    return self
        except DeadlineExceededError:
            left = remaining(deadline)
            if left is not None and left <= 0.05:
                raise _timeout_error(self, timeout) from None
            raise
        return self.reload()

    def watch(self, *, timeout: float | None = None) -> Iterator[Job]:
        """Snapshots of the job each time it changes, ending with its terminal
        state. Intermediate versions may be coalesced. Also refreshes this handle."""
        deadline = deadline_after(timeout)
        try:
            for message in self._api._watch_protos(self.id, from_version=0, deadline=deadline):
                self._replace_from_proto(message)
                yield Job._bound(message, self._api)
        except DeadlineExceededError:
            left = remaining(deadline)
            if left is not None and left <= 0.05:
                raise _timeout_error(self, timeout) from None
            raise

    def stream_metrics(self, *, from_sequence: int = 0, from_step: int | None = None) -> Iterator[MetricPoint]:
        """Every metric point from `from_sequence` on: the stored backlog, then
        live points, in order, each exactly once even across reconnects. Ends
        when the job is terminal. `from_step` skips points before that step."""
        return self._api.stream_metrics(self.id, from_sequence=from_sequence, from_step=from_step)

    def stream_events(self, *, types: EventTypes = None, from_sequence: int = 0) -> Iterator[JobEvent]:
        """Every event from `from_sequence` on (optionally only `types`), like
        :meth:`stream_metrics`."""
        return self._api.stream_events(self.id, types=types, from_sequence=from_sequence)

    def metrics(self, *, page_size: int | None = None) -> Pager[MetricPoint]:
        """The stored metric history, paged."""
        return self._api.list_metrics(self.id, page_size=page_size)

    def events(
        self, query: str | None = None, *, types: EventTypes = None, page_size: int | None = None
    ) -> Pager[JobEvent]:
        """The stored event log, paged; `query` matches message or code, ignoring case."""
        return self._api.list_events(self.id, query=query, types=types, page_size=page_size)

    def cancel(self, *, reason: CancelReason | str, note: str = "") -> Self:
        """Ask the job to stop (see ``jobs.cancel``); updates this handle."""
        self._replace_from_proto(self._api._cancel_proto(self.id, reason=reason, note=note))
        return self

    # ------------------------------------------------------------ control and recovery

    def pause(self) -> Self:
        """Checkpoint the training job and stop its worker; costs stop (see
        ``jobs.pause``). Updates this handle (PAUSING, then PAUSED)."""
        self._replace_from_proto(self._api._pause_proto(self.id))
        return self

    def resume(self, gpu_type: str | None = None, pricing: PricingTier | str | None = None) -> Self:
        """Queue the paused job again, optionally on another GPU type or
        pricing tier; it continues from the pause checkpoint. Updates this handle."""
        self._replace_from_proto(self._api._resume_proto(self.id, gpu_type=gpu_type, pricing=pricing))
        return self

    def retry(
        self,
        fixes: FixesArg = None,
        *,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        force: bool = False,
    ) -> Job:
        """A new job retrying this failed or cancelled one, as it was or with
        `fixes` (ids or :class:`~brightrun.RecoveryFix` objects); `force` starts
        it even if an unfinished job trains the same thing; see ``jobs.retry``."""
        return self._api.retry(
            self.id, fixes=fixes, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
        )

    def suggest_fixes(self) -> FixSuggestions:
        """The ranked fixes for this job's failure (a tuple of
        :class:`~brightrun.RecoveryFix`, best first, with ``failure_class``)."""
        return self._api.suggest_fixes(self.id)

    def retry_with_suggested_fix(
        self,
        fix: FixesArg = None,
        *,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        force: bool = False,
    ) -> Job:
        """A new job retrying this one with the best suggested fix a retry can
        apply (or `fix`: an id, a fix, or a list of them). Raises
        :class:`~brightrun.NoApplicableFixError` when none applies, e.g. for a
        dataset error, whose fix is a corrected upload. `force` as in :meth:`retry`."""
        return self._api.retry_with_suggested_fix(
            self.id, fix, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
        )

    def resume_from_checkpoint(
        self,
        checkpoint: str | Checkpoint | None = None,
        *,
        lr_schedule: LrScheduleMode | str = LrScheduleMode.CONTINUE,
        gpu_type: str | None = None,
        pricing: PricingTier | str | None = None,
        request_id: str | None = None,
        force: bool = False,
        **changes: Any,
    ) -> Job:
        """A continuation job resuming from `checkpoint` (default: the newest
        that verifies), with allowed `**changes` (batch_size, epochs, ...);
        `force` starts it even if an unfinished job trains the same thing;
        see ``jobs.resume_from_checkpoint``."""
        return self._api.resume_from_checkpoint(
            self.id,
            checkpoint,
            lr_schedule=lr_schedule,
            gpu_type=gpu_type,
            pricing=pricing,
            request_id=request_id,
            force=force,
            **changes,
        )

    def failure_report(self) -> FailureReport:
        """What happened, where, what the job left behind and what can be done."""
        return self._api.failure_report(self.id)

    def decide(self, choice: RecoveryChoice | str) -> Self:
        """Answer a job AWAITING_DECISION with one of ``decision.choices``
        (``"keep_trying"``, ``"switch_to_on_demand"``, ``"cancel"``). Updates this handle."""
        self._replace_from_proto(self._api._decide_proto(self.id, choice))
        return self

    def checkpoints(self) -> list[Checkpoint]:
        """The job's complete checkpoints, newest first."""
        return self._api.list_checkpoints(self.id)

    def switch_to_on_demand(self) -> Self:
        """Use on-demand capacity from the next attempt on. Updates this handle."""
        self._replace_from_proto(self._api._on_demand_proto(self.id))
        return self

    def promote(self, reason: PromotionReason | str, justification: str) -> Promotion:
        """Move this queued job to the front of the queue (see ``queue.promote``);
        updates this handle and returns the promotion with the jobs it delays."""
        response = self._api._promote_proto(self.id, reason, justification)
        self._replace_from_proto(response.job)
        return bind_promotion(response, lambda m: Job._bound(m, self._api))

    def raise_for_status(self) -> Self:
        """Raise JobFailedError / JobCancelledError if the job failed or was
        cancelled; otherwise return the job (so ``job.wait().raise_for_status()``)."""
        _raise_for_status(self)
        return self

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, name={self.name!r}, state={self.state})"


class AsyncJob(JobBase):
    """A job, bound to the :class:`~brightrun.AsyncClient` that fetched it."""

    _jobs: AsyncJobs | None = PrivateAttr(default=None)

    @classmethod
    def _bound(cls, message: job_pb2.Job, jobs: AsyncJobs) -> AsyncJob:
        job = cls.from_proto(message)
        job._jobs = jobs
        return job

    @property
    def _api(self) -> AsyncJobs:
        if self._jobs is None:
            raise RuntimeError("this AsyncJob is not bound to a client; get it with client.jobs.get(job_id)")
        return self._jobs

    async def reload(self) -> Self:
        """Fetch the job again and update this handle in place."""
        self._replace_from_proto(await self._api._get_proto(self.id))
        return self

    async def wait(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - the same API as the sync client
        *,
        on_decision: OnDecision = "raise",
    ) -> Self:
        """Wait until the job is terminal; see :meth:`Job.wait` (the same
        AWAITING_DECISION rule: JobNeedsDecision by default)."""
        check_on_decision(on_decision)
        if self.is_terminal:  # final; any other state may be stale, so watch
            return self
        deadline = deadline_after(timeout)
        try:
            async for message in self._api._watch_protos(self.id, from_version=0, deadline=deadline):
                self._replace_from_proto(message)
                if _stop_waiting(self, on_decision):
                    return self
        except DeadlineExceededError:
            left = remaining(deadline)
            if left is not None and left <= 0.05:
                raise _timeout_error(self, timeout) from None
            raise
        return await self.reload()

    async def watch(self, *, timeout: float | None = None) -> AsyncIterator[AsyncJob]:  # noqa: ASYNC109 - the same API as the sync client
        """Snapshots of the job each time it changes; see :meth:`Job.watch`."""
        deadline = deadline_after(timeout)
        try:
            async for message in self._api._watch_protos(self.id, from_version=0, deadline=deadline):
                self._replace_from_proto(message)
                yield AsyncJob._bound(message, self._api)
        except DeadlineExceededError:
            left = remaining(deadline)
            if left is not None and left <= 0.05:
                raise _timeout_error(self, timeout) from None
            raise

    def stream_metrics(self, *, from_sequence: int = 0, from_step: int | None = None) -> AsyncIterator[MetricPoint]:
        """Every metric point from `from_sequence` on; see :meth:`Job.stream_metrics`."""
        return self._api.stream_metrics(self.id, from_sequence=from_sequence, from_step=from_step)

    def stream_events(self, *, types: EventTypes = None, from_sequence: int = 0) -> AsyncIterator[JobEvent]:
        """Every event from `from_sequence` on; see :meth:`Job.stream_events`."""
        return self._api.stream_events(self.id, types=types, from_sequence=from_sequence)

    def metrics(self, *, page_size: int | None = None) -> AsyncPager[MetricPoint]:
        """The stored metric history, paged."""
        return self._api.list_metrics(self.id, page_size=page_size)

    def events(
        self, query: str | None = None, *, types: EventTypes = None, page_size: int | None = None
    ) -> AsyncPager[JobEvent]:
        """The stored event log, paged."""
        return self._api.list_events(self.id, query=query, types=types, page_size=page_size)

    async def cancel(self, *, reason: CancelReason | str, note: str = "") -> Self:
        """Ask the job to stop; updates this handle."""
        self._replace_from_proto(await self._api._cancel_proto(self.id, reason=reason, note=note))
        return self

    # ------------------------------------------------------------ control and recovery

    async def pause(self) -> Self:
        """Checkpoint the training job and stop its worker; see :meth:`Job.pause`."""
        self._replace_from_proto(await self._api._pause_proto(self.id))
        return self

    async def resume(self, gpu_type: str | None = None, pricing: PricingTier | str | None = None) -> Self:
        """Queue the paused job again; see :meth:`Job.resume`."""
        self._replace_from_proto(await self._api._resume_proto(self.id, gpu_type=gpu_type, pricing=pricing))
        return self

    async def retry(
        self,
        fixes: FixesArg = None,
        *,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        force: bool = False,
    ) -> AsyncJob:
        """A new job retrying this one; see :meth:`Job.retry`."""
        return await self._api.retry(
            self.id, fixes=fixes, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
        )

    async def suggest_fixes(self) -> FixSuggestions:
        """The ranked fixes for this job's failure; see :meth:`Job.suggest_fixes`."""
        return await self._api.suggest_fixes(self.id)

    async def retry_with_suggested_fix(
        self,
        fix: FixesArg = None,
        *,
        request_id: str | None = None,
        acknowledge_oom_risk: bool = False,
        force: bool = False,
    ) -> AsyncJob:
        """Retry with the best applicable suggested fix; see :meth:`Job.retry_with_suggested_fix`."""
        return await self._api.retry_with_suggested_fix(
            self.id, fix, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
        )

    async def resume_from_checkpoint(
        self,
        checkpoint: str | Checkpoint | None = None,
        *,
        lr_schedule: LrScheduleMode | str = LrScheduleMode.CONTINUE,
        gpu_type: str | None = None,
        pricing: PricingTier | str | None = None,
        request_id: str | None = None,
        force: bool = False,
        **changes: Any,
    ) -> AsyncJob:
        """A continuation job; see :meth:`Job.resume_from_checkpoint`."""
        return await self._api.resume_from_checkpoint(
            self.id,
            checkpoint,
            lr_schedule=lr_schedule,
            gpu_type=gpu_type,
            pricing=pricing,
            request_id=request_id,
            force=force,
            **changes,
        )

    async def failure_report(self) -> FailureReport:
        """The failure report; see :meth:`Job.failure_report`."""
        return await self._api.failure_report(self.id)

    async def decide(self, choice: RecoveryChoice | str) -> Self:
        """Answer a job awaiting a decision; see :meth:`Job.decide`."""
        self._replace_from_proto(await self._api._decide_proto(self.id, choice))
        return self

    async def checkpoints(self) -> list[Checkpoint]:
        """The job's complete checkpoints, newest first."""
        return await self._api.list_checkpoints(self.id)

    async def switch_to_on_demand(self) -> Self:
        """Use on-demand capacity from the next attempt on; see :meth:`Job.switch_to_on_demand`."""
        self._replace_from_proto(await self._api._on_demand_proto(self.id))
        return self

    async def promote(self, reason: PromotionReason | str, justification: str) -> Promotion:
        """Move this queued job to the front; see :meth:`Job.promote`."""
        response = await self._api._promote_proto(self.id, reason, justification)
        self._replace_from_proto(response.job)
        return bind_promotion(response, lambda m: AsyncJob._bound(m, self._api))

    def raise_for_status(self) -> Self:
        """Raise JobFailedError / JobCancelledError if the job failed or was cancelled."""
        _raise_for_status(self)
        return self

    def __repr__(self) -> str:
        return f"AsyncJob(id={self.id!r}, name={self.name!r}, state={self.state})"
