"""What users do about failures: pause and resume, decide an escalation, retry
(with suggested fixes), continue from a checkpoint, read the failure report.

Each action is one write transaction through the job service's helpers, so
the state machine, events and subscribers behave exactly as for every other
change. Decisions (which fixes, what a continuation may change) come from the
domain (domain/fixes.py, domain/recovery.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from brightrun_server.domain import fixes, recovery
from brightrun_server.domain.config import PresetName
from brightrun_server.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from brightrun_server.domain.estimate import UnknownModel, model_catalog, resolve_model
from brightrun_server.domain.failures import FailureClass
from brightrun_server.domain.pricing import PricingTier, resolve_gpu
from brightrun_server.domain.states import TERMINAL, JobState
from brightrun_server.services import estimation
from brightrun_server.services.jobs import Changes, CreateJobInput, JobService, Lineage, spend_usd, utcnow
from brightrun_server.store.db import Database
from brightrun_server.store.models import (
    AttemptRow,
    CheckpointRow,
    DatasetRow,
    EventRow,
    FixOutcomeRow,
    JobRow,
    MetricRow,
)
from brightrun_trainer.checkpoints import CheckpointError, verify_checkpoint
from brightrun_trainer.spec import TrainingParams


@dataclass(frozen=True, slots=True)
class ResumeInput:
    job_id: str
    checkpoint_id: str
    request_id: str
    changes: Mapping[str, Any]
    gpu_type: str
    pricing_tier: PricingTier | None
    lr_schedule_mode: str
    #: Create it even if an unfinished job trains the same thing (double-start guard).
    force: bool = False


class RecoveryService:
    def __init__(self, db: Database, jobs: JobService) -> None:
        self._db = db
        self._jobs = jobs

    # ------------------------------------------------------------------ pause / resume

    async def pause(self, job_id: str) -> JobRow:
        changes = Changes()
        async with self._db.write() as session:
            job = await self._jobs.lock_job(session, job_id)
            state = JobState(job.state)
            if state in (JobState.PAUSING, JobState.PAUSED):
                return job
            if state is not JobState.TRAINING:
                raise FailedPrecondition(
                    f"job {job_id} is {state.value}; only a training job can be paused",
                    reason="JOB_STATE_CONFLICT",
                    metadata={"job_id": job_id, "state": state.value, "allowed_states": "training"},
                )
            attempt = await self._jobs.current_attempt(session, job)
            self._jobs.set_state(session, job, JobState.PAUSING, changes, "Writing a checkpoint before pausing")
            if attempt is not None and attempt.end_time is None:
                attempt.stop_requested, attempt.stop_reason = True, "pause"
                changes.stops.append(attempt.id)
        self._jobs.publish(changes)
        return job

    async def resume(self, job_id: str, *, gpu_type: str, pricing_tier: PricingTier | None) -> JobRow:
        changes = Changes()
        async with self._db.write() as session:
            job = await self._jobs.lock_job(session, job_id)
            if JobState(job.state) is not JobState.PAUSED:
                raise FailedPrecondition(
                    f"job {job_id} is {job.state}; only a paused job can be resumed",
                    reason="JOB_STATE_CONFLICT",
                    metadata={"job_id": job_id, "state": job.state, "allowed_states": "paused"},
                )
            now = utcnow()
            self._apply_compute(session, job, changes, gpu_type, pricing_tier)
            if job.paused_since is not None:
                job.paused_seconds += (now - job.paused_since).total_seconds()
                job.paused_since = None
            step = job.latest_checkpoint["step"] if job.latest_checkpoint else 0
            self._jobs.set_state(session, job, JobState.QUEUED, changes, f"Queued to resume from step {step}")
        self._jobs.publish(changes)
        if self._jobs.control:
            self._jobs.control.wake()
        return job

    def _apply_compute(
        self, session: AsyncSession, job: JobRow, changes: Changes, gpu_type: str, tier: PricingTier | None
    ) -> None:
        if gpu_type:
            gpu = resolve_gpu(gpu_type)
            if gpu is None:
                raise InvalidArgument([FieldViolation("compute.gpu_type", f"unknown GPU type {gpu_type!r}")])
            job.compute = {**job.compute, "gpu_type": gpu.id}
            job.hourly_rate_usd = (
                gpu.spot_usd_per_hour if job.compute["pricing_tier"] == "spot" else gpu.on_demand_usd_per_hour
            )
        if tier is not None:
            self._jobs.switch_pricing(session, job, changes, tier)

    # ------------------------------------------------------------------ escalation

    async def decide(self, job_id: str, choice: recovery.Choice) -> JobRow:
        changes = Changes()
        async with self._db.write() as session:
            job = await self._jobs.lock_job(session, job_id)
            if JobState(job.state) is not JobState.AWAITING_DECISION or not job.decision:
                raise FailedPrecondition(
                    f"job {job_id} is {job.state}, not awaiting a decision",
                    reason="JOB_STATE_CONFLICT",
                    metadata={"job_id": job_id, "state": job.state, "allowed_states": "awaiting_decision"},
                )
            offered = list(job.decision.get("choices", []))
            if choice.value not in offered:
                raise InvalidArgument(
                    [FieldViolation("choice", f"must be one of {', '.join(c.upper() for c in offered)}")]
                )
            now = utcnow()
            doc = {"failure_class": job.recovering_class or FailureClass.WORKER_LOST.value, "reason": "Decided"}
            provisioning = job.decision.get("kind") == "provisioning"
            if choice is recovery.Choice.CANCEL:
                job.decision = None
                self._jobs.set_state(session, job, JobState.CANCELLED, changes, "Cancelled by decision")
                job.end_time = now
            elif provisioning:
                # Extend, or switch to on-demand: a new round of provisioning attempts.
                if choice is recovery.Choice.SWITCH_TO_ON_DEMAND:
                    self._jobs.switch_pricing(session, job, changes, PricingTier.ON_DEMAND)
                job.decision = None
                job.provisioning = {"attempt": 0, "max_attempts": self._jobs.provisioning_max_attempts}
                self._jobs.set_state(session, job, JobState.QUEUED, changes, f"Queued again ({choice.value})")
            else:
                if choice is recovery.Choice.SWITCH_TO_ON_DEMAND:
                    self._jobs.switch_pricing(session, job, changes, PricingTier.ON_DEMAND)
                job.consecutive_failures = 0
                self._jobs.recover(session, job, changes, doc, now, retry=1)
            self._jobs.event(session, job, changes, "info", "RECOVERY_DECIDED", f"Decision: {choice.value}")
        self._jobs.publish(changes)
        return job

    # ------------------------------------------------------------------ checkpoints

    async def checkpoints(self, job_id: str) -> list[CheckpointRow]:
        await self._jobs.get(job_id)
        async with self._db.read() as session:
            rows = await session.scalars(
                sa.select(CheckpointRow)
                .where(CheckpointRow.job_id == job_id)
                .order_by(CheckpointRow.step.desc(), CheckpointRow.create_time.desc())
            )
            return list(rows.all())

    def _verified(self, job_id: str, row: CheckpointRow) -> Path | None:
        """The checkpoint's directory if every file matches its manifest (the
        trainer's own check, so server and trainer agree on what is valid)."""
        path = self._jobs.job_dir(job_id) / row.path
        try:
            verify_checkpoint(path)
        except CheckpointError:
            return None
        return path

    # ------------------------------------------------------------------ fixes and retries

    async def suggest(self, job_id: str) -> tuple[FailureClass, list[fixes.Fix]]:
        job = await self._jobs.get(job_id)
        if JobState(job.state) not in (JobState.FAILED, JobState.CANCELLED) or (
            JobState(job.state) is JobState.FAILED and not job.failure
        ):
            raise FailedPrecondition(
                f"job {job_id} is {job.state}; fixes are suggested for failed or cancelled jobs",
                reason="JOB_STATE_CONFLICT",
                metadata={"job_id": job_id, "state": job.state, "allowed_states": "failed,cancelled"},
            )
        cls = FailureClass(job.failure["failure_class"]) if job.failure else FailureClass.USER_CANCEL
        async with self._db.read() as session:
            outcomes = await self._outcomes(session, cls)
            dataset = await session.get(DatasetRow, job.dataset_id)
        dataset_errors = list((dataset.validation if dataset else {}).get("first_errors", []))
        if job.failure and cls is FailureClass.DATASET_FORMAT:
            dataset_errors = [job.failure.get("message", ""), *dataset_errors]

        def estimator(params: Mapping[str, Any], model: str, compute: Mapping[str, Any]) -> fixes.Effect | None:
            gpu = resolve_gpu(str(compute.get("gpu_type", "")))
            if gpu is None:
                return None
            try:
                doc = estimation.run(
                    model,
                    TrainingParams.model_validate(dict(params)),
                    gpu,
                    PricingTier(compute.get("pricing_tier", "spot")),
                    dataset,
                )
            except InvalidArgument:
                return None
            tier_cost = doc.get("cost_spot") if compute.get("pricing_tier") == "spot" else doc.get("cost_on_demand")
            return fixes.Effect(
                memory_bytes=int(doc["total_bytes"]),
                duration_hours=_pair(doc["duration"]["hours"]) if doc.get("duration") else None,
                cost_usd=_pair(tier_cost["total_usd"]) if tier_cost else None,
                fits=doc["oom_risk"] != "high",
            )

        suggested = fixes.suggest(
            cls,
            job.params,
            base_model=job.base_model,
            compute=job.compute,
            estimator=estimator,
            outcomes=outcomes,
            dataset_errors=dataset_errors,
            smaller_model=_smaller_model(job.base_model),
        )
        return cls, suggested

    async def _outcomes(self, session: AsyncSession, cls: FailureClass) -> dict[str, tuple[int, int]]:
        """fix id -> (completed, ended) over retries after this failure class."""
        done = sa.func.sum(sa.case((JobRow.state == JobState.COMPLETED.value, 1), else_=0))
        rows = await session.execute(
            sa.select(FixOutcomeRow.fix_id, done, sa.func.count())
            .join(JobRow, JobRow.id == FixOutcomeRow.retry_job_id)
            .where(FixOutcomeRow.failure_class == cls.value, JobRow.state.in_([s.value for s in TERMINAL]))
            .group_by(FixOutcomeRow.fix_id)
        )
        return {fix_id: (int(completed or 0), int(total)) for fix_id, completed, total in rows.all()}

    async def retry(
        self, job_id: str, *, request_id: str, fix_ids: Sequence[str], acknowledge_oom_risk: bool, force: bool = False
    ) -> JobRow:
        source = await self._jobs.get(job_id)
        if JobState(source.state) not in (JobState.FAILED, JobState.CANCELLED):
            raise FailedPrecondition(
                f"job {job_id} is {source.state}; only failed or cancelled jobs can be retried",
                reason="JOB_STATE_CONFLICT",
                metadata={"job_id": job_id, "state": source.state, "allowed_states": "failed,cancelled"},
            )
        cls, suggested = await self.suggest(job_id)
        config_changes, model, compute_changes = fixes.combine(suggested, fix_ids) if fix_ids else ({}, "", {})
        async with self._db.read() as session:
            root = await session.get(JobRow, source.root_job_id) or source
            # The request id first: a replay (its first answer lost) is numbered as
            # that answer was, whatever retries exist now and whatever the limit
            # says; create() then returns the job it made, or refuses a reused id
            # with REQUEST_ID_REUSED when the requests differ.
            replayed = (
                await session.scalar(
                    sa.select(JobRow).where(JobRow.project == source.project, JobRow.request_id == request_id)
                )
                if request_id
                else None
            )
            retries = int(
                await session.scalar(
                    sa.select(sa.func.count())
                    .select_from(JobRow)
                    .where(JobRow.root_job_id == source.root_job_id, JobRow.retry_of.is_not(None))
                )
                or 0
            )
        if replayed is not None:
            number = replayed.retry_number
        elif retries >= recovery.MAX_RETRIES:
            raise FailedPrecondition(
                f"job {root.id} already has {retries} retries; at most {recovery.MAX_RETRIES} per original job",
                reason="RETRY_LIMIT_REACHED",
                metadata={"root_job_id": root.id, "retries": str(retries)},
            )
        else:
            number = retries + 1
        base_name = root.name
        params = {**source.params, **config_changes}
        compute = {**source.compute, **compute_changes}
        return await self._jobs.create(
            CreateJobInput(
                request_id=request_id,
                name=f"{base_name} (Retry #{number})"[:256],
                dataset_id=source.dataset_id,
                base_model=model or source.base_model,
                preset=PresetName(source.preset),
                overrides=params,
                gpu_type=str(compute["gpu_type"]),
                pricing_tier=PricingTier(compute["pricing_tier"]),
                max_duration=_seconds(compute["max_duration_seconds"]),
                labels=source.labels,
                acknowledge_oom_risk=acknowledge_oom_risk,
                recovery=_policy_keywords(source.recovery_policy),
                force=force,
                lineage=Lineage(
                    root_job_id=source.root_job_id,
                    retry_of=source.id,
                    retry_number=number,
                    applied_fixes=tuple(dict.fromkeys(fix_ids or ["retry_same_config"])),
                    failure_class=cls.value,
                ),
            )
        )

    # ------------------------------------------------------------------ continuation

    async def resume_from_checkpoint(self, inp: ResumeInput) -> JobRow:
        source = await self._jobs.get(inp.job_id)
        if JobState(source.state) not in (JobState.FAILED, JobState.CANCELLED, JobState.COMPLETED):
            raise FailedPrecondition(
                f"job {source.id} is {source.state}; continue from the checkpoint of a job that has ended "
                "(a paused job resumes with ResumeJob)",
                reason="JOB_STATE_CONFLICT",
                metadata={"job_id": source.id, "state": source.state, "allowed_states": "failed,cancelled,completed"},
            )
        recovery.check_resume_changes(source.params, inp.changes)
        rows = await self.checkpoints(source.id)
        if inp.checkpoint_id:
            chosen = next((r for r in rows if r.id == inp.checkpoint_id), None)
            if chosen is None:
                raise NotFound("checkpoint", inp.checkpoint_id)
            path = self._verified(source.id, chosen)
            if path is None:
                raise FailedPrecondition(
                    f"checkpoint {chosen.id} at step {chosen.step} fails its checksums; choose another",
                    reason="CHECKPOINT_CORRUPT",
                    metadata={"checkpoint_id": chosen.id},
                )
        else:
            found = next(((r, p) for r in rows if (p := self._verified(source.id, r)) is not None), None)
            if found is None:
                raise FailedPrecondition(
                    f"job {source.id} has no checkpoint that verifies",
                    reason="NO_VALID_CHECKPOINT",
                    metadata={"job_id": source.id, "checkpoints": str(len(rows))},
                )
            chosen, path = found
        mode = inp.lr_schedule_mode or "continue"
        return await self._jobs.create(
            CreateJobInput(
                request_id=inp.request_id,
                name=f"{source.name} (from step {chosen.step})"[:256],
                dataset_id=source.dataset_id,
                base_model=source.base_model,
                preset=PresetName(source.preset),
                overrides={**source.params, **inp.changes},
                gpu_type=inp.gpu_type or str(source.compute["gpu_type"]),
                pricing_tier=inp.pricing_tier or PricingTier(source.compute["pricing_tier"]),
                max_duration=_seconds(source.compute["max_duration_seconds"]),
                labels=source.labels,
                acknowledge_oom_risk=True,
                recovery=_policy_keywords(source.recovery_policy),
                force=inp.force,
                lineage=Lineage(
                    root_job_id=source.root_job_id,
                    resumed_from_job_id=source.id,
                    resumed_from_checkpoint_id=chosen.id,
                    resume_checkpoint_path=str(path),
                    lr_schedule_mode=mode,
                ),
            )
        )

    # ------------------------------------------------------------------ report

    async def failure_report(self, job_id: str) -> dict[str, Any]:
        job = await self._jobs.get(job_id)
        if JobState(job.state) not in TERMINAL or JobState(job.state) is JobState.COMPLETED:
            raise FailedPrecondition(
                f"job {job_id} is {job.state}; a failure report exists for failed or cancelled jobs",
                reason="JOB_STATE_CONFLICT",
                metadata={"job_id": job_id, "state": job.state, "allowed_states": "failed,cancelled"},
            )
        checkpoints = await self.checkpoints(job_id)
        async with self._db.read() as session:
            attempts = list((await session.scalars(sa.select(AttemptRow).where(AttemptRow.job_id == job_id))).all())
            metric_count = int(await session.scalar(sa.select(sa.func.count()).where(MetricRow.job_id == job_id)) or 0)
            event_count = int(await session.scalar(sa.select(sa.func.count()).where(EventRow.job_id == job_id)) or 0)
            last_eval = await session.scalar(
                sa.select(MetricRow.eval_loss)
                .where(MetricRow.job_id == job_id, MetricRow.eval_loss.is_not(None))
                .order_by(MetricRow.seq.desc())
                .limit(1)
            )
            last_train = await session.scalar(
                sa.select(MetricRow.train_loss)
                .where(MetricRow.job_id == job_id, MetricRow.train_loss.is_not(None))
                .order_by(MetricRow.seq.desc())
                .limit(1)
            )
        latest = job.latest_metrics or {}
        now = utcnow()
        actions = self._actions(job, checkpoints)
        return {
            "job": job,
            "failure": job.failure or _cancel_failure(job),
            "checkpoints": checkpoints,
            "files_written": _files(self._jobs.job_dir(job_id)),
            "actual": {
                "peak_memory_bytes": latest.get("memory_peak_bytes"),
                "billed_seconds": spend_usd(job, now) / job.hourly_rate_usd * 3600 if job.hourly_rate_usd else 0.0,
                "spend_usd": spend_usd(job, now),
                "attempts": len(attempts),
            },
            "partial": {
                "metric_points": metric_count,
                "events": event_count,
                "checkpoints": len(checkpoints),
                "last_train_loss": last_train,
                "last_eval_loss": last_eval,
            },
            "actions": actions,
        }

    def _actions(self, job: JobRow, checkpoints: Sequence[CheckpointRow]) -> list[dict[str, str]]:
        failure = job.failure or {}
        cls = failure.get("failure_class", FailureClass.USER_CANCEL.value)
        unfixable_by_retry = cls in (FailureClass.DATASET_FORMAT.value, FailureClass.MODEL_UNAVAILABLE.value)
        actions: list[dict[str, str]] = []
        if cls == FailureClass.DATASET_FORMAT.value:
            actions.append(
                _action(
                    "fix_dataset",
                    "Fix the dataset and upload it again",
                    "Run `brightrun datasets validate FILE` for every error with its place and fix.",
                )
            )
        if cls == FailureClass.MODEL_UNAVAILABLE.value:
            actions.append(
                _action(
                    "switch_model",
                    "Check or switch the base model",
                    "The model could not be loaded: check its name, access rights or local path.",
                )
            )
        if cls == FailureClass.DISK_FULL.value:
            actions.append(
                _action(
                    "free_space",
                    "Free disk space",
                    "Checkpoints and published artifacts are intact; free space, then continue from the checkpoint.",
                )
            )
        if failure.get("recovery") == "suggest_fixes" or cls == FailureClass.OUT_OF_MEMORY.value:
            actions.append(
                _action(
                    "retry_with_fix",
                    "Retry with a suggested fix",
                    "SuggestFixes ranks fixes with their expected effect; RetryJob applies them.",
                    "RetryJob",
                )
            )
        if checkpoints and not unfixable_by_retry:
            actions.append(
                _action(
                    "resume_from_checkpoint",
                    f"Continue from the checkpoint at step {checkpoints[0].step}",
                    "A continuation job resumes from the newest verified checkpoint; only later steps are redone.",
                    "ResumeFromCheckpoint",
                )
            )
        if not unfixable_by_retry:
            actions.append(
                _action(
                    "retry",
                    "Retry with the same configuration",
                    "A new job with the same configuration, linked to this one.",
                    "RetryJob",
                )
            )
        if cls == FailureClass.INTERNAL.value:
            actions.append(
                _action("report", "Report the problem", "An internal error: include the job id and the log tail.")
            )
        return actions


def _cancel_failure(job: JobRow) -> dict[str, Any]:
    return {
        "failure_class": FailureClass.USER_CANCEL.value,
        "reason": "Cancelled by user",
        "message": job.cancel_note or "",
        "step": job.current_step,
        "retryable": False,
        "origin": "user",
        "recovery": "none",
        "evidence": [f"cancel reason: {job.cancel_reason}"],
    }


def _action(kind: str, title: str, description: str, rpc: str = "") -> dict[str, str]:
    return {"kind": kind, "title": title, "description": description, "rpc": rpc}


def _files(job_dir: Path, limit: int = 500) -> list[str]:
    found: list[str] = []
    for root, _dirs, names in os.walk(job_dir):
        for name in sorted(names):
            found.append(str(Path(root, name).relative_to(job_dir)))
            if len(found) >= limit:
                return found
    return found


def _smaller_model(base_model: str) -> str:
    """The largest catalog model of the same family with at most 60% of the
    parameters, if there is one."""
    try:
        arch = resolve_model(base_model)
    except UnknownModel:
        return ""
    size = arch.parameter_count()
    smaller = [m for m in model_catalog().models if m.family == arch.family and m.parameter_count() <= size * 0.6]
    return max(smaller, key=lambda m: m.parameter_count()).id if smaller else ""


def _policy_keywords(policy: Mapping[str, Any]) -> dict[str, Any]:
    p = recovery.RecoveryPolicy.from_dict(policy)
    return {
        "max_system_retries": p.max_system_retries,
        "initial_backoff_seconds": p.initial_backoff_seconds,
        "max_backoff_seconds": p.max_backoff_seconds,
        "on_exhausted": p.on_exhausted,
    }


def _pair(values: Sequence[float]) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=float(value))
