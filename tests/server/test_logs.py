"""Logs: structured access lines, and no dataset text or secrets in any log.

A marker string rides in a dataset's messages and in a malformed line (so
validation errors and their context excerpts quote it) through upload,
validation, issue listing and export, a refused job, and a real job whose
trainer fails in training (a tiny model with NaN embeddings). The server runs
as its own process with its stderr captured; every log file under its data
dir (the trainers') is read too. With ``debug_log_data`` the marker must show
up — the check can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from brightrun.v1 import dataset_service_pb2 as ds
from brightrun.v1 import dataset_service_pb2_grpc, job_pb2, job_service_pb2_grpc, trainer_service_pb2_grpc
from brightrun.v1 import job_service_pb2 as js
from tests.conftest import TEST_API_KEY, auth_channel
from tests.server.conftest import Stubs

State = job_pb2.Job.State
#: The part of the test key that must never be logged (its id may be).
KEY_SECRET = TEST_API_KEY.rsplit("_", 1)[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    address: str
    data_dir: Path
    log_file: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server_process(tmp: Path, **settings: str) -> ServerProcess:
    data_dir, ready, log_file = tmp / "data", tmp / "port", tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIGHTRUN_")}
    env |= {
        "BRIGHTRUN_BOOTSTRAP_API_KEY": TEST_API_KEY,
        "BRIGHTRUN_TRAINER_THREADS": "1",
        "BRIGHTRUN_HEARTBEAT_SECONDS": "1",
        "BRIGHTRUN_STOP_GRACE_SECONDS": "5",
        "BRIGHTRUN_LOG_LEVEL": "DEBUG",
        **{f"BRIGHTRUN_{k.upper()}": v for k, v in settings.items()},
    }
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "brightrun_server", "--port", "0", "--data-dir", str(data_dir),
             "--ready-file", str(ready)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text().strip():
        assert proc.poll() is None, log_file.read_text()[-3000:]
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    return ServerProcess(proc, f"127.0.0.1:{ready.read_text().strip()}", data_dir, log_file)


def chat(marker: str, i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "system", "content": f"You are a support agent. Internal note {marker}."},
                {"role": "user", "content": f"Question {i}: my order {marker} never arrived, what now?"},
                {"role": "assistant", "content": f"Sorry about order {marker}; I have sent a replacement."},
            ]
        }
    )


def write_datasets(tmp: Path, marker: str) -> tuple[Path, Path]:
    good = tmp / "good.jsonl"
    good.write_text("".join(chat(marker, i) + "\n" for i in range(24)))
    bad = tmp / "bad.jsonl"
    lines = [chat(marker, i) for i in range(5)]
    lines.insert(2, '{"messages": [{"role": "user", "content": "where is ' + marker + '"}, {"role": ')
    bad.write_text("".join(line + "\n" for line in lines))
    return good, bad


def nan_model(tiny_model: Path, tmp: Path) -> Path:
    """The tiny model with NaN embeddings: the first training step's loss is NaN."""
    from safetensors.torch import load_file, save_file

    broken = tmp / "nan-model"
    if not broken.exists():
        shutil.copytree(tiny_model, broken)
        weights = load_file(broken / "model.safetensors")
        weights["model.embed_tokens.weight"].fill_(float("nan"))
        save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def upload(stubs: Stubs, path: Path) -> Any:
    data = path.read_bytes()

    def requests() -> Iterator[ds.UploadDatasetRequest]:
        yield ds.UploadDatasetRequest(metadata=ds.UploadDatasetMetadata(filename=path.name))
        yield ds.UploadDatasetRequest(chunk=data)

    return stubs.datasets.UploadDataset(requests(), metadata=(("x-request-id", f"upload-{path.stem}"),), timeout=60)


def exercise(stubs: Stubs, data_dir: Path, good: Path, bad: Path, model: Path, marker: str) -> str:
    """Everything a dataset goes through, ending with a job that fails in
    training; returns the attempt token the server gave that trainer."""
    invalid = upload(stubs, bad)
    assert invalid.state == invalid.STATE_INVALID
    issues = stubs.datasets.ListValidationErrors(
        ds.ListValidationErrorsRequest(dataset_id=invalid.id, include_context=True)
    )
    assert marker in str(issues), "the API shows the data to its owner"
    exported = b"".join(
        c.chunk for c in stubs.datasets.ExportValidationErrors(ds.ExportValidationErrorsRequest(dataset_id=invalid.id))
    )
    assert exported
    stubs.datasets.ValidateDataset(ds.ValidateDatasetRequest(dataset_id=invalid.id, base_model=str(model)))
    with pytest.raises(grpc.RpcError) as refused:
        stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=invalid.id, base_model=str(model)))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    dataset = upload(stubs, good)
    assert dataset.state == dataset.STATE_READY
    config = job_pb2.TrainingConfig(max_seq_length=512, epochs=1, max_steps=3, batch_size=2)
    job = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model=str(model), overrides=config))
    failed = stubs.wait_state(job.id, {State.STATE_FAILED, State.STATE_COMPLETED, State.STATE_CANCELLED}, 240)
    assert failed.state == State.STATE_FAILED, failed.state_message
    assert failed.failure.exception_type == "LossDivergenceError"
    assert failed.failure.stage == job_pb2.STAGE_TRAINING
    stubs.jobs.GetFailureReport(js.GetFailureReportRequest(job_id=job.id))
    stubs.jobs.ListJobEvents(js.ListJobEventsRequest(job_id=job.id))
    spec = json.loads((data_dir / "jobs" / job.id / "attempts" / "1" / "spec.json").read_text())
    return str(spec["report"]["token"])


def run(tmp: Path, tiny_model: Path, *, debug: bool) -> tuple[str, dict[Path, str], str]:
    """Exercise a server; its log, every other log under its data dir, and the marker."""
    marker = f"MRK{uuid.uuid4().hex}"
    tmp.mkdir(parents=True, exist_ok=True)
    good, bad = write_datasets(tmp, marker)
    model = nan_model(tiny_model, tmp.parent)
    server = start_server_process(tmp, debug_log_data="true" if debug else "false")
    try:
        channel = auth_channel(server.address)
        stubs = Stubs(
            channel,
            dataset_service_pb2_grpc.DatasetServiceStub(channel),
            job_service_pb2_grpc.JobServiceStub(channel),
            trainer_service_pb2_grpc.TrainerServiceStub(channel),
        )
        try:
            token = exercise(stubs, server.data_dir, good, bad, model, marker)
        finally:
            stubs.channel.close()
    finally:
        server.stop()
    server_log = server.log_file.read_text(errors="replace")
    others = {p: p.read_text(errors="replace") for p in sorted(server.data_dir.rglob("*.log"))}
    assert any(p.name == "trainer.log" for p in others), sorted(others)
    for text in (server_log, *others.values()):
        assert KEY_SECRET not in text, "an API key's secret was logged"
        assert token not in text, "an attempt token was logged"
    return server_log, others, marker


def leaks(marker: str, server_log: str, others: dict[Path, str]) -> list[str]:
    found = [f"server: {line[:300]}" for line in server_log.splitlines() if marker in line]
    for path, text in others.items():
        found += [f"{path.name}: {line[:300]}" for line in text.splitlines() if marker in line]
    return found


@pytest.mark.slow
def test_no_dataset_text_or_secret_in_any_log_unless_debug_log_data(tmp_path: Path, tiny_model: Path) -> None:
    server_log, others, marker = run(tmp_path / "quiet", tiny_model, debug=False)
    assert leaks(marker, server_log, others) == []

    # Access lines: JSON, one per call, with the request id, method, status,
    # duration and the caller's key and project.
    access = [
        record
        for line in server_log.splitlines()
        if line.startswith("{") and (record := json.loads(line))["logger"] == "brightrun_server.access"
    ]
    assert access
    for record in access:
        assert {"request_id", "rpc_method", "status", "duration_ms", "key_id", "project"} <= record.keys(), record
    uploads = [r for r in access if r["rpc_method"].endswith("/UploadDataset")]
    assert {r["request_id"] for r in uploads} == {"upload-good", "upload-bad"}
    assert {(r["status"], r["key_id"], r["project"]) for r in uploads} == {("OK", "testadmin001", "default")}
    refused = [r for r in access if r["rpc_method"].endswith("/CreateJob") and r["status"] != "OK"]
    assert [(r["status"], r["reason"]) for r in refused] == [("FAILED_PRECONDITION", "DATASET_INVALID")]
    assert any(r["rpc_method"].endswith("/ReportAttempt") for r in access), "trainer calls are logged too"

    # The same with debug_log_data: now the data is logged, by the server
    # (validation issues) and by the trainer (the first training example).
    server_log, others, marker = run(tmp_path / "debug", tiny_model, debug=True)
    shown = leaks(marker, server_log, others)
    assert any(line.startswith("server:") for line in shown), shown
    assert any(line.startswith("trainer.log:") for line in shown), shown
