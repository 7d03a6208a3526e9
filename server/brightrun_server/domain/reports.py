"""What a trainer can report, as plain data (the API layer translates protos)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from brightrun_server.domain.states import StageName


@dataclass(frozen=True, slots=True)
class StageUpdate:
    stage: StageName
    #: "running" or "succeeded"
    status: str
    message: str = ""
    progress: float = 0.0


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    current_step: int
    total_steps: int
    epoch: float
    total_epochs: int


@dataclass(frozen=True, slots=True)
class MetricValues:
    step: int
    epoch: float
    #: Only the metrics measured at this step, by MetricRow column name.
    values: dict[str, float | int]


@dataclass(frozen=True, slots=True)
class EventInput:
    #: status | metrics | warning | error | info | checkpoint
    type: str
    code: str
    message: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckpointInput:
    step: int
    epoch: float
    path: str
    size_bytes: int
    manifest_sha256: str


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    #: succeeded | failed | stopped
    outcome: str
    adapter_path: str = ""
    final_eval_loss: float | None = None
    final_perplexity: float | None = None
    final_train_loss: float | None = None
    #: The trainer's failure document (JobFailure fields), if it failed.
    failure: dict[str, Any] | None = None
    last_step: int = 0


ReportBody = StageUpdate | ProgressUpdate | MetricValues | EventInput | CheckpointInput | AttemptOutcome


@dataclass(frozen=True, slots=True)
class Report:
    sequence: int
    time: datetime
    body: ReportBody | None
