"""Server test helpers: raw gRPC stubs and a scripted trainer.

A *scripted trainer* is a real worker process launched by the real executor that
only sleeps; the test plays the trainer over the real TrainerService RPC with
the attempt token the server wrote into the attempt's spec file. That gives
exact control over duplicates, gaps, crashes and results without touching the
server's own logic.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from brightrun.v1 import (
    api_key_service_pb2,
    api_key_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    trainer_service_pb2,
    trainer_service_pb2_grpc,
)
from tests.conftest import EXAMPLES, TEST_API_KEY, ServerHandle, start_server, stop_server

TERMINAL = {job_pb2.Job.STATE_COMPLETED, job_pb2.Job.STATE_FAILED, job_pb2.Job.STATE_CANCELLED}


@dataclass
class Stubs:
    channel: grpc.Channel
    datasets: dataset_service_pb2_grpc.DatasetServiceStub
    jobs: job_service_pb2_grpc.JobServiceStub
    trainer: trainer_service_pb2_grpc.TrainerServiceStub
    keys: api_key_service_pb2_grpc.ApiKeyServiceStub | None = None

    def new_key(self, name: str, role: int = api_key_service_pb2.ROLE_MEMBER) -> str:
        """A new key in this caller's project; its secret."""
        assert self.keys is not None
        created = self.keys.CreateApiKey(api_key_service_pb2.CreateApiKeyRequest(name=name, role=role))
        return str(created.secret)

    def upload(self, data: bytes, *, filename: str = "data.jsonl", **meta: Any) -> Any:
        def requests() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
            yield dataset_service_pb2.UploadDatasetRequest(
                metadata=dataset_service_pb2.UploadDatasetMetadata(filename=filename, **meta)
            )
            for i in range(0, len(data), 65536):
                yield dataset_service_pb2.UploadDatasetRequest(chunk=data[i : i + 65536])

        return self.datasets.UploadDataset(requests())

    def upload_example(self) -> Any:
        return self.upload((EXAMPLES / "support_chat.jsonl").read_bytes(), filename="support_chat.jsonl")

    def get_job(self, job_id: str) -> job_pb2.Job:
        return self.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))

    def wait_state(self, job_id: str, states: set[int], timeout: float = 60) -> job_pb2.Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.state in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} stayed {job_pb2.Job.State.Name(job.state)}: {job.state_message}")
            time.sleep(0.05)


def stubs_for(handle: ServerHandle, api_key: str | None = TEST_API_KEY) -> Stubs:
    channel = handle.channel(api_key)
    return Stubs(
        channel,
        dataset_service_pb2_grpc.DatasetServiceStub(channel),
        job_service_pb2_grpc.JobServiceStub(channel),
        trainer_service_pb2_grpc.TrainerServiceStub(channel),
        api_key_service_pb2_grpc.ApiKeyServiceStub(channel),
    )


@pytest.fixture
def stubs(server: ServerHandle) -> Iterator[Stubs]:
    s = stubs_for(server)
    yield s
    s.channel.close()


@pytest.fixture
def any_stubs(any_server: ServerHandle) -> Iterator[Stubs]:
    s = stubs_for(any_server)
    yield s
    s.channel.close()


def details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]]]:
    """ErrorInfo and BadRequest field violations of an error status."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status details"
    info = error_details_pb2.ErrorInfo()
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    assert info.domain == "brightrun.dev", "every error carries an ErrorInfo"
    return info, violations


# ---------------------------------------------------------------- scripted trainer


@pytest.fixture(scope="session")
def sleeper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An executable that stands in for the trainer interpreter and just sleeps."""
    path = tmp_path_factory.mktemp("bin") / "sleeping-trainer"
    # Python, not `exec sleep`: the process must keep its arguments (the spec path).
    # Like a real trainer it survives SIGTERM (a trainer checkpoints, then stops);
    # the executor's SIGKILL after the grace period ends it. Installing the
    # handler is the first thing it does (-S skips the site imports before it),
    # and attach() waits until it is installed: a pause or cancel in between
    # would otherwise kill the stand-in (a lost worker, not a stopped one).
    path.write_text(
        f"#!{sys.executable} -S\nimport signal\nsignal.signal(signal.SIGTERM, lambda *_: None)\n"
        "import time\ntime.sleep(600)\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def scripted(tmp_path: Path, sleeper: Path) -> Iterator[tuple[ServerHandle, Stubs]]:
    handle = start_server(tmp_path, trainer_python=str(sleeper), stop_grace_seconds=2.0)
    s = stubs_for(handle)
    yield handle, s
    s.channel.close()
    stop_server(handle)


@pytest.fixture(params=["sqlite", "postgres"])
def scripted_any(request: pytest.FixtureRequest, tmp_path: Path, sleeper: Path) -> Iterator[tuple[ServerHandle, Stubs]]:
    """`scripted`, on SQLite and on PostgreSQL."""
    url = request.getfixturevalue("pg_schema_url") if request.param == "postgres" else None
    handle = start_server(tmp_path, database_url=url, trainer_python=str(sleeper), stop_grace_seconds=2.0)
    s = stubs_for(handle)
    yield handle, s
    s.channel.close()
    stop_server(handle)


@dataclass
class ScriptedAttempt:
    """The test's side of one running attempt."""

    stubs: Stubs
    job_id: str
    attempt_id: str
    token: str
    attempt_dir: Path
    pid: int
    seq: int = 0
    sent: list[trainer_service_pb2.AttemptReport] = field(default_factory=list)

    def next(self, **kind: Any) -> trainer_service_pb2.AttemptReport:
        self.seq += 1
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        report = trainer_service_pb2.AttemptReport(sequence=self.seq, time=now, **kind)
        self.sent.append(report)
        return report

    def send(
        self, reports: list[trainer_service_pb2.AttemptReport], token: str | None = None
    ) -> trainer_service_pb2.ReportAttemptResponse:
        response: trainer_service_pb2.ReportAttemptResponse = self.stubs.trainer.ReportAttempt(
            trainer_service_pb2.ReportAttemptRequest(attempt_id=self.attempt_id, reports=reports),
            metadata=(("x-brightrun-attempt-token", self.token if token is None else token),),
        )
        return response

    def stage(self, stage: int, status: int = job_pb2.JobStage.STATUS_RUNNING, message: str = "") -> Any:
        return self.send(
            [self.next(stage=trainer_service_pb2.StageReport(stage=stage, status=status, message=message))]
        )

    def metrics(self, steps: range, *, loss: Callable[[int], float] = lambda s: 2.0 / (s + 1)) -> Any:
        reports = [self.next(metric=job_pb2.MetricPoint(step=s, epoch=s / 100, train_loss=loss(s))) for s in steps]
        return self.send(reports)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)


def start_scripted_job(stubs: Stubs, *, overrides: job_pb2.TrainingConfig | None = None) -> ScriptedAttempt:
    dataset = stubs.upload_example()
    job = stubs.jobs.CreateJob(
        job_service_pb2.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model", overrides=overrides)
    )
    stubs.wait_state(job.id, {job_pb2.Job.STATE_PROVISIONING})
    return attach(stubs, job.id)


def attach(stubs: Stubs, job_id: str, attempt: int = 1, timeout: float = 30) -> ScriptedAttempt:
    """Find the attempt's spec (written by the server) and its worker pid, once
    the worker is ready: it handles SIGTERM (see `sleeper`)."""
    deadline = time.monotonic() + timeout
    while True:
        job = stubs.get_job(job_id)
        spec_paths = [
            p for p in Path("/proc").glob("[0-9]*/cmdline") if _cmdline_has(p, f"{job_id}/attempts/{attempt}/spec.json")
        ]
        if spec_paths:
            pid = int(spec_paths[0].parent.name)
            cmd = spec_paths[0].read_bytes().split(b"\0")
            spec_path = Path(cmd[cmd.index(b"--spec") + 1].decode())
            spec = json.loads(spec_path.read_text())
            wait_until_ready(pid, deadline)
            return ScriptedAttempt(stubs, job.id, spec["attempt_id"], spec["report"]["token"], spec_path.parent, pid)
        if time.monotonic() > deadline:
            raise AssertionError(f"no worker process for {job_id} attempt {attempt}")
        time.sleep(0.05)


def wait_until_ready(pid: int, deadline: float) -> None:
    """Wait until worker `pid` catches SIGTERM (its SigCgt mask in
    /proc/PID/status), the sleeper's first act; return at once if it is gone
    (the test will see why)."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            return
        if fields.get("State", "Z").split()[0] in ("Z", "X"):
            return
        if int(fields.get("SigCgt", "0").split()[0], 16) & (1 << (signal.SIGTERM - 1)):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {pid} never installed its SIGTERM handler")
        time.sleep(0.01)


def _cmdline_has(path: Path, marker: str) -> bool:
    try:
        return marker.encode() in path.read_bytes()
    except OSError:
        return False


def stage_adapter(attempt: ScriptedAttempt) -> str:
    """Write a staged adapter the way the trainer does; return its job-relative path."""
    staged = attempt.attempt_dir.parent.parent / "staging" / "adapter"
    staged.mkdir(parents=True, exist_ok=True)
    (staged / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
    (staged / "adapter_model.safetensors").write_bytes(hashlib.sha256(b"weights").digest() * 8)
    return "staging/adapter"
