"""A live server seeded with real resources for the RPC fuzzer.

The world holds a dataset, a failed job with a checkpoint and suggested fixes,
a running job played by a scripted trainer (its attempt id and token), a
queued job behind it (one slot) and throwaway API keys. Fuzzed requests use
these ids part of the time so they get past NOT_FOUND. Fuzzing changes the
world (it cancels jobs, deletes datasets, finishes attempts); `refresh()`
restores a running attempt, a queued job and a dataset before each RPC.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from brightrun.v1 import api_key_service_pb2 as ak
from brightrun.v1 import dataset_service_pb2 as ds
from brightrun.v1 import job_pb2
from brightrun.v1 import job_service_pb2 as js
from brightrun.v1 import trainer_service_pb2 as ts
from brightrun_trainer.checkpoints import CheckpointStore
from tests.conftest import ServerHandle, start_server, stop_server
from tests.server.conftest import (
    TERMINAL,
    ScriptedAttempt,
    Stubs,
    sleeper,
    start_scripted_job,
    stubs_for,
    wait_until_ready,
)
from tests.server.rpcs import Rpc

__all__ = ["sleeper"]  # the scripted trainer's stand-in interpreter, a fixture

S = job_pb2.Stage
RUNNING = {
    job_pb2.Job.STATE_PROVISIONING,
    job_pb2.Job.STATE_PREPROCESSING,
    job_pb2.Job.STATE_MODEL_LOADING,
    job_pb2.Job.STATE_TRAINING,
}


@dataclass
class World:
    handle: ServerHandle
    stubs: Stubs
    datasets: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    fix_ids: list[str] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)
    attempt_ids: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)
    attempt: ScriptedAttempt | None = None
    #: The served methods, by path (set by the tests).
    rpcs: dict[str, Rpc] = field(default_factory=dict)

    # ------------------------------------------------------------ seeding

    def seed(self) -> None:
        self.datasets.append(self.stubs.upload_example().id)
        failed = self._failed_job_with_checkpoint()
        self.jobs.append(failed)
        assert self.stubs.jobs.ListJobCheckpoints(js.ListJobCheckpointsRequest(job_id=failed)).checkpoints
        fixes = self.stubs.jobs.SuggestFixes(js.SuggestFixesRequest(job_id=failed)).fixes
        self.fix_ids.extend(f.id for f in fixes)
        for i in range(2):
            created = self.stubs.keys.CreateApiKey(ak.CreateApiKeyRequest(name=f"fuzz-{i}"))  # type: ignore[union-attr]
            self.key_ids.append(created.api_key.id)
        self.refresh()
        listed = self.stubs.jobs.ListJobs(js.ListJobsRequest(page_size=1))
        self.page_tokens.append(listed.next_page_token)

    def _failed_job_with_checkpoint(self) -> str:
        attempt = start_scripted_job(self.stubs)
        self.attempt_ids.append(attempt.attempt_id)
        for stage in (S.STAGE_PREPROCESSING, S.STAGE_MODEL_LOADING, S.STAGE_TRAINING):
            attempt.stage(stage)
        attempt.metrics(range(1, 4))
        store = CheckpointStore(attempt.attempt_dir.parent.parent / "checkpoints")

        def payload(tmp: Path) -> None:
            (tmp / "adapter_model.safetensors").write_bytes(b"w" * 64)
            (tmp / "trainer_state.json").write_text(json.dumps({"step": 2}))

        saved = store.save(2, payload, {"epoch": 0.02})
        report = ts.CheckpointReport(
            step=2,
            epoch=0.02,
            path=str(saved.path.relative_to(attempt.attempt_dir.parent.parent)),
            size_bytes=saved.size_bytes,
            manifest_sha256=saved.manifest_sha256,
        )
        attempt.send([attempt.next(checkpoint=report)])
        failure = job_pb2.JobFailure(
            exception_type="OutOfMemoryError", message="CUDA out of memory.", stage=S.STAGE_TRAINING, step=3
        )
        attempt.send([attempt.next(result=ts.AttemptResult(outcome=ts.AttemptResult.OUTCOME_FAILED, failure=failure))])
        attempt.kill(signal.SIGKILL)
        self.stubs.wait_state(attempt.job_id, TERMINAL)
        for c in self.stubs.jobs.ListJobCheckpoints(js.ListJobCheckpointsRequest(job_id=attempt.job_id)).checkpoints:
            self.checkpoints.append(c.id)
        return attempt.job_id

    # ------------------------------------------------------------ upkeep

    def refresh(self) -> None:
        """A dataset, a running attempt the test plays and a queued job, again."""
        try:
            self.stubs.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=self.datasets[-1]))
        except grpc.RpcError:
            self.datasets.append(self.stubs.upload_example().id)
        if self.attempt is None or not self._live(self.attempt):
            self.attempt = self._running_attempt()
        queued = self.stubs.jobs.ListJobs(js.ListJobsRequest(filter="state = QUEUED", page_size=1)).jobs
        if not queued:
            self.jobs.append(self._create(f"fuzz-queued-{len(self.jobs)}"))

    def _create(self, name: str) -> str:
        job = self.stubs.jobs.CreateJob(
            js.CreateJobRequest(dataset_id=self.datasets[-1], base_model="scripted/model", name=name, force=True)
        )
        return str(job.id)

    def _live(self, attempt: ScriptedAttempt) -> bool:
        """Whether the attempt still runs; if not, its stand-in trainer is
        ended (a real trainer exits once it has reported a result)."""
        job = self.stubs.get_job(attempt.job_id)
        if job.state in RUNNING and job.attempt_count == int(attempt.attempt_dir.name):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(attempt.pid, signal.SIGKILL)
        return False

    def _running_attempt(self) -> ScriptedAttempt:
        """The attempt holding the one slot, brought to TRAINING with a few metrics;
        a new job if none is running or queued to run."""
        deadline = time.monotonic() + 60
        while True:
            found = self._worker()
            if found is not None:
                break
            active = (
                self.stubs.jobs.ListJobs(js.ListJobsRequest(filter="state = QUEUED", page_size=1)).jobs
                or self.stubs.jobs.ListJobs(js.ListJobsRequest(filter="state = PROVISIONING", page_size=1)).jobs
            )
            if not active:
                self.jobs.append(self._create(f"fuzz-running-{len(self.jobs)}"))
            if time.monotonic() > deadline:
                raise AssertionError("no worker started for the fuzz world")
            time.sleep(0.1)
        pid, spec_path, spec = found
        wait_until_ready(pid, deadline)
        attempt = ScriptedAttempt(
            self.stubs, spec["job_id"], spec["attempt_id"], spec["report"]["token"], spec_path.parent, pid
        )
        self.jobs.append(attempt.job_id)
        self.attempt_ids.append(attempt.attempt_id)
        try:
            for stage in (S.STAGE_PREPROCESSING, S.STAGE_MODEL_LOADING, S.STAGE_TRAINING):
                attempt.stage(stage)
            attempt.metrics(range(1, 4))
        except grpc.RpcError:
            pass  # cancelled meanwhile; the next refresh finds another
        return attempt

    def _worker(self) -> tuple[int, Path, dict[str, object]] | None:
        """A live worker of this server whose job is not being stopped."""
        root = str(self.handle.data_dir)
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                parts = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--spec" not in parts:
                continue
            spec_path = Path(parts[parts.index(b"--spec") + 1].decode())
            if not str(spec_path).startswith(root):
                continue
            try:
                spec = json.loads(spec_path.read_text())
                state = Path(f"/proc/{cmdline.parent.name}/status").read_text()
            except (OSError, ValueError):
                continue
            if "State:\tZ" in state:
                continue
            job = self.stubs.get_job(str(spec["job_id"]))
            if job.state in (job_pb2.Job.STATE_PROVISIONING, job_pb2.Job.STATE_PREPROCESSING):
                return int(cmdline.parent.name), spec_path, spec
        return None


def build_world(tmp_path: Path, sleeper: Path, database_url: str | None = None) -> Iterator[World]:
    handle = start_server(
        tmp_path,
        database_url=database_url,
        trainer_python=str(sleeper),
        stop_grace_seconds=1.0,
        max_concurrent_jobs=1,
        rate_limit_per_second=0,  # the limiter has its own tests; here it would only eat examples
    )
    stubs = stubs_for(handle)
    try:
        world = World(handle, stubs)
        world.seed()
        yield world
    finally:
        stubs.channel.close()
        stop_server(handle)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sleeper: Path) -> Iterator[World]:
    yield from build_world(tmp_path_factory.mktemp("fuzz"), sleeper)
