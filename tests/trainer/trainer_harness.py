"""Helpers of the trainer tests: specs, trainer subprocesses, outbox reading."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from brightrun.v1 import trainer_service_pb2, trainer_service_pb2_grpc
from brightrun_trainer.spec import ATTEMPT_TOKEN_METADATA, AttemptSpec, ReportTarget, TrainingParams

REPO = Path(__file__).resolve().parents[2]
CHAT_DATA = REPO / "examples" / "data" / "support_chat.jsonl"

#: Third-party warnings we cannot avoid in in-process tests (peft calls a
#: transformers API deprecated in 5.x; bitsandbytes warns about its CPU kernels).
THIRD_PARTY_WARNINGS = (
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    "ignore::UserWarning:bitsandbytes",
)

#: Parameters shared by runs whose losses are compared with each other.
EXACT_PARAMS = {
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "learning_rate": 5e-3,
    "epochs": 1,
    "batch_size": 4,
    "gradient_accumulation_steps": 2,
    "max_seq_length": 96,
    "warmup_ratio": 0.1,
    "checkpoint_interval_steps": 4,
    "max_steps": 24,
    "seed": 1234,
}


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_spec(
    job_dir: Path,
    model: Path,
    *,
    attempt: int = 1,
    dataset: Path = CHAT_DATA,
    dataset_format: str = "chat_jsonl",
    report: ReportTarget | None = None,
    **params: Any,
) -> AttemptSpec:
    return AttemptSpec(
        job_id="job_test",
        attempt_id=f"att_{attempt}",
        attempt_number=attempt,
        job_dir=job_dir,
        dataset_path=dataset,
        dataset_format=dataset_format,
        base_model=str(model),
        params=TrainingParams(**params),
        threads=1,
        report=report,
        heartbeat_seconds=1.0,
    )


@dataclass
class Attempt:
    spec: AttemptSpec
    proc: subprocess.Popen[bytes]

    @property
    def outbox(self) -> Path:
        return self.spec.attempt_dir / "reports.jsonl"

    def reports(self) -> list[dict[str, Any]]:
        return read_reports(self.outbox)

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120) -> None:
        """Poll the outbox until a report matches (the process must still be running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(r) for r in self.reports()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited with {self.proc.returncode} before the report")
            time.sleep(0.01)
        raise AssertionError("timed out waiting for a report")

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def result(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.spec.attempt_dir / "result.json").read_text())
        return data


def start_attempt(spec: AttemptSpec) -> Attempt:
    spec.attempt_dir.mkdir(parents=True, exist_ok=True)
    spec_path = spec.attempt_dir / "spec.json"
    spec_path.write_text(spec.model_dump_json(indent=2))
    with open(spec.attempt_dir / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "brightrun_trainer", "run", "--spec", str(spec_path)],
            env=trainer_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return Attempt(spec, proc)


def run_attempt(spec: AttemptSpec, timeout: float = 240) -> Attempt:
    attempt = start_attempt(spec)
    attempt.wait(timeout)
    return attempt


def read_reports(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


def train_losses(reports: list[dict[str, Any]]) -> dict[int, float]:
    """step -> train loss of every metric report with one."""
    losses: dict[int, float] = {}
    for r in reports:
        metric = r.get("metric")
        if metric and "trainLoss" in metric:
            step = int(metric["step"])
            assert step not in losses, f"step {step} reported twice in one attempt"
            losses[step] = metric["trainLoss"]
    return losses


def events(reports: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [r["event"] for r in reports if "event" in r and r["event"].get("code") == code]


TOKEN = "secret-token"


class FlakyTrainerService(trainer_service_pb2_grpc.TrainerServiceServicer):
    """Stores each sequence once (only if it is last + 1), like the real server.

    ``chaos`` is the share of calls that misbehave: UNAVAILABLE before storing,
    storing then failing (a lost acknowledgement), or acknowledging only part.
    """

    def __init__(
        self,
        *,
        chaos: float = 0.0,
        fail_first: int = 0,
        stop_after: int | None = None,
        stop_when: Callable[[trainer_service_pb2.AttemptReport], bool] | None = None,
        forget_at: int | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.rng = random.Random(0)
        self.chaos = chaos
        self.fail_first = fail_first
        self.stop_after = stop_after
        self.stop_when = stop_when
        self.stopping = False
        self.forget_at = forget_at
        self.stored: list[trainer_service_pb2.AttemptReport] = []
        self.calls = 0
        self.empty_calls = 0
        self.gaps = 0
        self.max_batch = 0

    @property
    def last(self) -> int:
        return self.stored[-1].sequence if self.stored else 0

    def ReportAttempt(
        self, request: trainer_service_pb2.ReportAttemptRequest, context: Any
    ) -> trainer_service_pb2.ReportAttemptResponse:
        metadata = dict(context.invocation_metadata())
        if metadata.get(ATTEMPT_TOKEN_METADATA) != TOKEN:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        with self.lock:
            self.calls += 1
            self.empty_calls += not request.reports
            self.max_batch = max(self.max_batch, len(request.reports))
            behaviour = "ok"
            if self.calls <= self.fail_first:
                behaviour = "unavailable"
            elif self.rng.random() < self.chaos:
                behaviour = self.rng.choice(["unavailable", "lost_ack", "partial"])
            if behaviour == "unavailable":
                context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            reports = list(request.reports)
            if behaviour == "partial":
                reports = reports[: len(reports) // 2]
            for report in reports:
                if report.sequence == self.last + 1:
                    self.stored.append(report)
                elif report.sequence > self.last + 1:
                    self.gaps += 1
                    break
            if self.forget_at is not None and self.last >= self.forget_at:
                del self.stored[self.forget_at // 2 :]  # e.g. restored from an old backup
                self.forget_at = None
            if behaviour == "lost_ack":
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            directive = trainer_service_pb2.DIRECTIVE_CONTINUE
            if self.stop_after is not None and self.last >= self.stop_after:
                self.stopping = True
            if self.stop_when is not None and any(self.stop_when(r) for r in reports):
                self.stopping = True
            if self.stopping:
                directive = trainer_service_pb2.DIRECTIVE_STOP
            return trainer_service_pb2.ReportAttemptResponse(acknowledged_sequence=self.last, directive=directive)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve(service: FlakyTrainerService, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound
