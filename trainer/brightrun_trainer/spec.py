"""The launch contract between the server (or a user) and one trainer attempt.

The server writes an :class:`AttemptSpec` as JSON to
``{job_dir}/attempts/{n}/spec.json`` and starts ``python -m brightrun_trainer run
--spec that-file``. This module imports nothing heavy (no torch), so the server
can build specs without the trainer's dependencies.

Directory layout under ``job_dir`` (shared by every attempt of a job)::

    checkpoints/step-00000100/    complete checkpoints, each with manifest.json
    checkpoints/.tmp-*/           checkpoints being written (ignored on resume)
    checkpoints/LATEST            name of the newest complete checkpoint
    attempts/{n}/spec.json        this spec
    attempts/{n}/trainer.log      the attempt's log (dataset text redacted)
    attempts/{n}/reports.jsonl    write-ahead outbox of every report, in order
    attempts/{n}/result.json      the final AttemptResult, also reported
    staging/adapter/              the finished adapter, published by the server

Exit codes of the trainer process: :data:`EXIT_SUCCEEDED`, :data:`EXIT_FAILED`
(a failure document was reported), :data:`EXIT_STOPPED` (stopped on request or
SIGTERM after checkpointing). Anything else is a crash.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

EXIT_SUCCEEDED = 0
EXIT_FAILED = 3
EXIT_STOPPED = 4

#: Metadata key carrying the attempt token on TrainerService calls.
ATTEMPT_TOKEN_METADATA = "x-brightrun-attempt-token"


class LrSchedule(StrEnum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class QuantizationMode(StrEnum):
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


class TrainingParams(BaseModel):
    """Fully resolved hyperparameters; the server validated the ranges."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    epochs: int = 3
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    max_seq_length: int = 2048
    lr_scheduler: LrSchedule = LrSchedule.COSINE
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    quantization: QuantizationMode = QuantizationMode.NONE
    checkpoint_interval_steps: int = 100
    validation_split: float = 0.2
    gradient_checkpointing: bool = False
    #: Stop after this many optimiser steps; 0 runs every epoch.
    max_steps: int = 0
    #: Steps between evaluations; 0 evaluates at each epoch end and checkpoint.
    eval_interval_steps: int = 0


class ReportTls(BaseModel):
    """TLS for the report channel (PEM files the trainer reads at start)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The CA that signed the server's certificate (or that certificate itself).
    ca_file: Path
    #: The trainer's client certificate and key, for a server that requires
    #: mutual TLS; both or neither.
    cert_file: Path | None = None
    key_file: Path | None = None


class ReportTarget(BaseModel):
    """Where the trainer reports; absent for a run without a server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: gRPC target of the TrainerService, e.g. ``127.0.0.1:50051``.
    address: str
    #: Per-attempt token sent in :data:`ATTEMPT_TOKEN_METADATA`.
    token: str
    #: Report over TLS; None for a plaintext server.
    tls: ReportTls | None = None


class AttemptSpec(BaseModel):
    """Everything one trainer attempt needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    attempt_id: str
    attempt_number: int = Field(ge=1)
    job_dir: Path
    dataset_path: Path
    #: One of brightrun.validation.DatasetFormat's values.
    dataset_format: str
    #: Hub name or local directory, loaded with from_pretrained either way.
    base_model: str
    params: TrainingParams
    #: Resume from the newest complete checkpoint under job_dir if one exists.
    resume: bool = True
    #: Resume from this checkpoint directory instead of the newest.
    resume_from: Path | None = None
    #: For a continuation (resume_from another job's checkpoint with changed
    #: params): "continue" the original learning-rate schedule, or
    #: "restart_warmup" from the resumed step over the remaining steps.
    lr_schedule_mode: str = "continue"
    report: ReportTarget | None = None
    #: torch intra-op threads; None leaves torch's default.
    threads: int | None = None
    #: Seconds between trainer heartbeats to the server.
    heartbeat_seconds: float = 5.0
    #: Log dataset text (prompts, responses) for debugging; off by default.
    debug_log_data: bool = False
    #: Complete checkpoints kept under ``checkpoints/``; older ones are deleted
    #: once a newer one is complete.
    keep_checkpoints: int = Field(default=3, ge=1)

    @property
    def attempt_dir(self) -> Path:
        return self.job_dir / "attempts" / str(self.attempt_number)

    @property
    def checkpoints_dir(self) -> Path:
        return self.job_dir / "checkpoints"

    @property
    def staging_dir(self) -> Path:
        return self.job_dir / "staging"
