"""The one seam between training and reporting (HF ``TrainerCallback`` style).

The training code calls a :class:`TrainerCallback` with plain values; it never
builds protos or knows about gRPC. :class:`brightrun_trainer.report.Reporter`
is the production implementation; tests may record calls with their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any


class StageName(IntEnum):
    """Stages of an attempt; values equal ``brightrun.v1.Stage``."""

    PREPROCESSING = 2
    MODEL_LOADING = 3
    TRAINING = 4
    FINALIZATION = 5


class StageStatus(IntEnum):
    """Values equal ``brightrun.v1.JobStage.Status``."""

    RUNNING = 2
    SUCCEEDED = 3


class EventType(IntEnum):
    """Values equal ``brightrun.v1.JobEvent.Type``."""

    STATUS = 1
    METRICS = 2
    WARNING = 3
    ERROR = 4
    INFO = 5
    CHECKPOINT = 6


class Outcome(IntEnum):
    """Values equal ``brightrun.v1.AttemptResult.Outcome``."""

    SUCCEEDED = 1
    FAILED = 2
    STOPPED = 3


class EventCode(StrEnum):
    """Stable machine-readable event codes the trainer emits."""

    DATASET_LOADED = "DATASET_LOADED"
    EXAMPLES_TRUNCATED = "EXAMPLES_TRUNCATED"
    EXAMPLES_DROPPED = "EXAMPLES_DROPPED"
    CHAT_TEMPLATE_DEFAULTED = "CHAT_TEMPLATE_DEFAULTED"
    MODEL_LOADED = "MODEL_LOADED"
    RESUMED_FROM_CHECKPOINT = "RESUMED_FROM_CHECKPOINT"
    PLAN_CHANGED = "PLAN_CHANGED"
    SCHEDULE_RESTARTED = "SCHEDULE_RESTARTED"
    CHECKPOINT_SKIPPED = "CHECKPOINT_SKIPPED"
    CHECKPOINT_SAVED = "CHECKPOINT_SAVED"
    EVALUATION = "EVALUATION"
    STOP_REQUESTED = "STOP_REQUESTED"
    ADAPTER_SAVED = "ADAPTER_SAVED"
    TRAINING_FAILED = "TRAINING_FAILED"


@dataclass(frozen=True, slots=True)
class StepMetrics:
    """Values measured at one optimiser step; ``None`` means not measured."""

    step: int
    epoch: float
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


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A checkpoint that is complete and renamed into place."""

    step: int
    epoch: float
    #: Directory relative to the job directory, e.g. ``checkpoints/step-00000100``.
    path: str
    size_bytes: int
    manifest_sha256: str


@dataclass(frozen=True, slots=True)
class FailureInfo:
    """The trainer's own account of a failure; the server classifies it."""

    exception_type: str
    message: str
    reason: str
    stage: StageName | None
    step: int
    log_tail: tuple[str, ...] = ()
    #: ``brightrun.v1.FailureClass`` value; 0 (unspecified) lets the server decide.
    failure_class: int = 0


@dataclass(frozen=True, slots=True)
class ResultInfo:
    """How the attempt ended."""

    outcome: Outcome
    last_step: int
    adapter_path: str = ""
    final_eval_loss: float | None = None
    final_perplexity: float | None = None
    final_train_loss: float | None = None
    failure: FailureInfo | None = None


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    code: EventCode
    message: str
    payload: dict[str, Any] = field(default_factory=dict)


class TrainerCallback:
    """Receives everything an attempt has to say; every method is a no-op here."""

    def on_stage(self, stage: StageName, status: StageStatus, message: str, progress: float) -> None:
        """A stage started, progressed (``progress`` from 0 to 1) or ended."""

    def on_metric(self, metrics: StepMetrics) -> None:
        """Metric values at an optimiser step."""

    def on_event(self, event: Event) -> None:
        """Something notable happened."""

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        """A checkpoint is complete."""

    def on_progress(self, current_step: int, total_steps: int, epoch: float, total_epochs: int) -> None:
        """Training progress after an optimiser step."""

    def on_result(self, result: ResultInfo) -> None:
        """The attempt's outcome; the last call."""

    def info(self, code: EventCode, message: str, **payload: Any) -> None:
        self.on_event(Event(EventType.INFO, code, message, payload))

    def warning(self, code: EventCode, message: str, **payload: Any) -> None:
        self.on_event(Event(EventType.WARNING, code, message, payload))
