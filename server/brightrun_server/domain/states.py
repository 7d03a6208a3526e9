"""The job state machine. Every state change goes through :func:`transition`;
a change the table below does not list is impossible."""

from __future__ import annotations

from enum import StrEnum

from brightrun_server.domain.errors import FailedPrecondition


class JobState(StrEnum):
    QUEUED = "queued"
    PROVISIONING = "provisioning"
    PREPROCESSING = "preprocessing"
    MODEL_LOADING = "model_loading"
    TRAINING = "training"
    FINALIZATION = "finalization"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    PAUSING = "pausing"
    PAUSED = "paused"
    RECOVERING = "recovering"
    AWAITING_DECISION = "awaiting_decision"


class StageName(StrEnum):
    PROVISIONING = "provisioning"
    PREPROCESSING = "preprocessing"
    MODEL_LOADING = "model_loading"
    TRAINING = "training"
    FINALIZATION = "finalization"


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

#: States in which a worker may be running for the job.
ACTIVE = frozenset(
    {
        JobState.PROVISIONING,
        JobState.PREPROCESSING,
        JobState.MODEL_LOADING,
        JobState.TRAINING,
        JobState.FINALIZATION,
        JobState.CANCELLING,
        JobState.PAUSING,
    }
)

#: States in which no worker runs but the job is not over.
WAITING = frozenset({JobState.QUEUED, JobState.PAUSED, JobState.RECOVERING, JobState.AWAITING_DECISION})

#: The job state while a stage runs.
STAGE_STATE = {
    StageName.PROVISIONING: JobState.PROVISIONING,
    StageName.PREPROCESSING: JobState.PREPROCESSING,
    StageName.MODEL_LOADING: JobState.MODEL_LOADING,
    StageName.TRAINING: JobState.TRAINING,
    StageName.FINALIZATION: JobState.FINALIZATION,
}

#: Where any running attempt may end up: failed, cancelled, or waiting to
#: recover automatically or for a decision.
_RUNNING_EXITS = {JobState.FAILED, JobState.CANCELLING, JobState.RECOVERING, JobState.AWAITING_DECISION}

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PROVISIONING, JobState.CANCELLED, JobState.FAILED}),
    JobState.PROVISIONING: frozenset({JobState.PREPROCESSING, JobState.CANCELLED, *_RUNNING_EXITS}),
    JobState.PREPROCESSING: frozenset({JobState.MODEL_LOADING, *_RUNNING_EXITS}),
    JobState.MODEL_LOADING: frozenset({JobState.TRAINING, *_RUNNING_EXITS}),
    JobState.TRAINING: frozenset({JobState.FINALIZATION, JobState.PAUSING, *_RUNNING_EXITS}),
    JobState.FINALIZATION: frozenset({JobState.COMPLETED, *_RUNNING_EXITS}),
    JobState.CANCELLING: frozenset({JobState.CANCELLED}),
    JobState.PAUSING: frozenset({JobState.PAUSED, JobState.FAILED, JobState.CANCELLING}),
    JobState.PAUSED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.RECOVERING: frozenset(
        {JobState.PROVISIONING, JobState.AWAITING_DECISION, JobState.CANCELLED, JobState.FAILED}
    ),
    # RECOVERING after a decision to keep trying a recovery; QUEUED after one to
    # extend provisioning or switch a never-started job to on-demand.
    JobState.AWAITING_DECISION: frozenset({JobState.RECOVERING, JobState.QUEUED, JobState.CANCELLED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(FailedPrecondition):
    reason = "JOB_STATE_CONFLICT"

    def __init__(self, job_id: str, current: JobState, target: JobState) -> None:
        super().__init__(
            f"job {job_id} cannot go from {current} to {target}",
            metadata={"job_id": job_id, "state": current.value, "target_state": target.value},
        )
        self.current = current
        self.target = target


def can_transition(current: JobState, target: JobState) -> bool:
    return target in ALLOWED[current]


def transition(job_id: str, current: JobState, target: JobState) -> JobState:
    """Return `target` if the move is allowed; raise IllegalTransition otherwise."""
    if not can_transition(current, target):
        raise IllegalTransition(job_id, current, target)
    return target
