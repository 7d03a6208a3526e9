"""Reporting: a write-ahead outbox file plus a background gRPC sender.

Every report gets the attempt's next sequence number (from 1) and is appended
to ``{attempt_dir}/reports.jsonl`` (one ``json_format`` object a line, flushed)
*before* it is sent. A daemon thread delivers reports through
``TrainerService.ReportAttempt``: it sends at once when idle, batches whatever
piled up while a call was in flight, resends from ``acknowledged_sequence + 1``
after any failure with exponential backoff and jitter (never dropping a
report), and sends an empty batch as a heartbeat when nothing was sent for
``heartbeat_seconds``. A ``DIRECTIVE_STOP`` in any response calls
``on_stop_directive``.

The sender uses its own ``random.Random`` for jitter: the global generators
belong to training and are part of the checkpointed state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf import json_format, struct_pb2

from brightrun.v1 import job_pb2, trainer_service_pb2, trainer_service_pb2_grpc
from brightrun_trainer.callbacks import (
    CheckpointInfo,
    Event,
    ResultInfo,
    StageName,
    StageStatus,
    StepMetrics,
    TrainerCallback,
)
from brightrun_trainer.spec import ATTEMPT_TOKEN_METADATA, ReportTarget

log = logging.getLogger(__name__)

#: Most reports sent in one call.
MAX_BATCH = 256
#: Deadline of one ReportAttempt call, in seconds.
RPC_TIMEOUT = 10.0
#: First and largest backoff after a failed call, in seconds.
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 10.0


def report_to_json(report: trainer_service_pb2.AttemptReport) -> str:
    """One outbox line (without the newline)."""
    return json.dumps(json_format.MessageToDict(report), separators=(",", ":"))


def read_outbox(path: str | Path) -> list[trainer_service_pb2.AttemptReport]:
    """Every complete report in an outbox file, in order (a torn last line is skipped)."""
    reports = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            report = trainer_service_pb2.AttemptReport()
            json_format.Parse(line, report)
            reports.append(report)
    return reports


def metric_point(metrics: StepMetrics, attempt_number: int) -> job_pb2.MetricPoint:
    point = job_pb2.MetricPoint(attempt=attempt_number, step=metrics.step, epoch=metrics.epoch)
    point.time.GetCurrentTime()
    for name in (
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
    ):
        value = getattr(metrics, name)
        if value is not None:
            setattr(point, name, value)
    return point


def _json_safe(value: Any) -> Any:
    """Plain JSON values; non-finite floats become null (Struct cannot hold them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def _struct(payload: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(_json_safe(payload))
    return s


def result_proto(result: ResultInfo) -> trainer_service_pb2.AttemptResult:
    proto = trainer_service_pb2.AttemptResult(
        outcome=int(result.outcome),  # type: ignore[arg-type]
        adapter_path=result.adapter_path,
        last_step=result.last_step,
    )
    if result.final_eval_loss is not None:
        proto.final_eval_loss = result.final_eval_loss
    if result.final_perplexity is not None:
        proto.final_perplexity = result.final_perplexity
    if result.final_train_loss is not None:
        proto.final_train_loss = result.final_train_loss
    if result.failure is not None:
        f = result.failure
        proto.failure.CopyFrom(
            job_pb2.JobFailure(
                failure_class=f.failure_class,  # type: ignore[arg-type]
                reason=f.reason,
                message=f.message,
                stage=int(f.stage) if f.stage is not None else 0,  # type: ignore[arg-type]
                step=f.step,
                exception_type=f.exception_type,
                log_tail=list(f.log_tail),
            )
        )
    return proto


def _recover_outbox(path: Path) -> int:
    """Last sequence in an existing outbox; a torn last line is cut off first.

    A fresh attempt starts at sequence 1. Should a process ever run again for
    the same attempt directory, it continues the numbering instead of reusing
    sequences the server may already hold.
    """
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    reports = read_outbox(path)
    return reports[-1].sequence if reports else 0


def report_channel(target: ReportTarget) -> grpc.Channel:
    """A channel to the server's TrainerService: TLS when the spec says so."""
    if target.tls is None:
        return grpc.insecure_channel(target.address)
    tls = target.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes(),
        private_key=tls.key_file.read_bytes() if tls.key_file else None,
        certificate_chain=tls.cert_file.read_bytes() if tls.cert_file else None,
    )
    return grpc.secure_channel(target.address, credentials)


class Reporter(TrainerCallback):
    """Sequences, persists and delivers an attempt's reports."""

    def __init__(
        self,
        *,
        attempt_id: str,
        attempt_number: int,
        outbox_path: Path,
        target: ReportTarget | None,
        heartbeat_seconds: float = 5.0,
        on_stop_directive: Callable[[], None] | None = None,
        max_batch: int = MAX_BATCH,
        backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_MAX),
    ) -> None:
        self._attempt_id = attempt_id
        self._attempt_number = attempt_number
        self._outbox_path = outbox_path
        self._target = target
        self._heartbeat = heartbeat_seconds
        self._on_stop = on_stop_directive
        self._max_batch = max_batch
        self._backoff = backoff
        self._cond = threading.Condition()
        self._pending: deque[trainer_service_pb2.AttemptReport] = deque()
        self._closing = False
        self._abort = threading.Event()
        self._stop_seen = False
        self._thread: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        outbox_path.parent.mkdir(parents=True, exist_ok=True)
        self._sequence = _recover_outbox(outbox_path)
        self._acked = 0
        self._outbox: IO[str] = open(outbox_path, "a", encoding="utf-8")  # noqa: SIM115

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread (a no-op without a report target)."""
        if self._target is None or self._thread is not None:
            return
        self._channel = report_channel(self._target)
        self._thread = threading.Thread(target=self._run_sender, name="reporter", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 12.0) -> bool:
        """Deliver what is pending within ``timeout`` seconds, then stop; True if all acked."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        delivered = True
        if self._thread is not None:
            self._thread.join(timeout)
            delivered = not self._thread.is_alive()
            self._abort.set()
            with self._cond:
                self._cond.notify_all()
            self._thread.join(1.0)
        if self._channel is not None:
            self._channel.close()
        with self._cond:
            if not self._outbox.closed:
                self._outbox.flush()
                os.fsync(self._outbox.fileno())
                self._outbox.close()
        if not delivered:
            log.warning("reports after sequence %d were not acknowledged before exit", self._acked)
        return delivered

    @property
    def last_sequence(self) -> int:
        return self._sequence

    @property
    def acknowledged_sequence(self) -> int:
        return self._acked

    # -- TrainerCallback ---------------------------------------------------------

    def on_stage(self, stage: StageName, status: StageStatus, message: str, progress: float) -> None:
        self._emit(
            trainer_service_pb2.AttemptReport(
                stage=trainer_service_pb2.StageReport(
                    stage=int(stage),  # type: ignore[arg-type]
                    status=int(status),  # type: ignore[arg-type]
                    message=message,
                    progress=min(1.0, max(0.0, progress)),
                )
            )
        )

    def on_metric(self, metrics: StepMetrics) -> None:
        self._emit(trainer_service_pb2.AttemptReport(metric=metric_point(metrics, self._attempt_number)))

    def on_event(self, event: Event) -> None:
        proto = job_pb2.JobEvent(
            type=int(event.type),  # type: ignore[arg-type]
            code=str(event.code),
            message=event.message,
            payload=_struct(event.payload),
            attempt=self._attempt_number,
        )
        proto.time.GetCurrentTime()
        self._emit(trainer_service_pb2.AttemptReport(event=proto))

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        self._emit(
            trainer_service_pb2.AttemptReport(
                checkpoint=trainer_service_pb2.CheckpointReport(
                    step=checkpoint.step,
                    epoch=checkpoint.epoch,
                    path=checkpoint.path,
                    size_bytes=checkpoint.size_bytes,
                    manifest_sha256=checkpoint.manifest_sha256,
                )
            )
        )

    def on_progress(self, current_step: int, total_steps: int, epoch: float, total_epochs: int) -> None:
        self._emit(
            trainer_service_pb2.AttemptReport(
                progress=trainer_service_pb2.ProgressReport(
                    current_step=current_step,
                    total_steps=total_steps,
                    epoch=epoch,
                    total_epochs=total_epochs,
                )
            )
        )

    def on_result(self, result: ResultInfo) -> None:
        self._emit(trainer_service_pb2.AttemptReport(result=result_proto(result)))

    # -- internals ---------------------------------------------------------------

    def _emit(self, report: trainer_service_pb2.AttemptReport) -> None:
        report.time.GetCurrentTime()
        with self._cond:
            if self._outbox.closed:
                raise RuntimeError("reporter is closed")
            self._sequence += 1
            report.sequence = self._sequence
            self._outbox.write(report_to_json(report) + "\n")
            self._outbox.flush()
            if self._target is not None:
                self._pending.append(report)
                self._cond.notify_all()

    def _reload(self, first: int, last: int) -> list[trainer_service_pb2.AttemptReport]:
        """Reports ``first..last`` from the outbox (when the server forgot acked ones)."""
        return [r for r in read_outbox(self._outbox_path) if first <= r.sequence <= last]

    def _next_batch(self) -> list[trainer_service_pb2.AttemptReport] | None:
        """Wait for something to send; None when the thread should end. Holds no lock."""
        with self._cond:
            deadline = time.monotonic() + self._heartbeat
            while not self._pending and not self._abort.is_set():
                if self._closing:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []  # heartbeat
                self._cond.wait(remaining)
            if self._abort.is_set():
                return None
            return list(self._pending)[: self._max_batch]

    def _run_sender(self) -> None:
        assert self._channel is not None
        assert self._target is not None
        stub = trainer_service_pb2_grpc.TrainerServiceStub(self._channel)
        metadata = ((ATTEMPT_TOKEN_METADATA, self._target.token),)
        jitter = random.Random()
        failures = 0
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            request = trainer_service_pb2.ReportAttemptRequest(attempt_id=self._attempt_id, reports=batch)
            progressed = False
            try:
                response = stub.ReportAttempt(request, timeout=RPC_TIMEOUT, metadata=metadata)
            except grpc.RpcError as e:
                code_of = getattr(e, "code", None)
                code = code_of() if callable(code_of) else None
                if failures == 0 or failures % 20 == 0:
                    log.warning("ReportAttempt failed (%s); retrying", code)
            else:
                progressed = self._acknowledge(response.acknowledged_sequence) or not batch
                if response.directive == trainer_service_pb2.DIRECTIVE_STOP and not self._stop_seen:
                    self._stop_seen = True
                    log.info("server directive: stop")
                    if self._on_stop is not None:
                        self._on_stop()
            if progressed:
                failures = 0
                continue
            failures += 1
            initial, cap = self._backoff
            delay = min(cap, initial * 2 ** min(failures - 1, 16))
            self._abort.wait(delay * (0.5 + jitter.random() / 2))
            if self._abort.is_set():
                return

    def _acknowledge(self, acked: int) -> bool:
        """Drop acknowledged reports; True when the acknowledgement moved forward."""
        with self._cond:
            moved = acked > self._acked
            self._acked = max(self._acked, acked)
            while self._pending and self._pending[0].sequence <= acked:
                self._pending.popleft()
            first = self._pending[0].sequence if self._pending else self._sequence + 1
            if acked + 1 < first and acked < self._sequence:
                # The server acknowledged less than it had before: resend from there.
                self._outbox.flush()
                missing = self._reload(acked + 1, first - 1)
                self._pending.extendleft(reversed(missing))
                self._acked = acked
                moved = True
            return moved
