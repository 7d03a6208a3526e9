"""Fixtures for the SDK and CLI tests, on top of tests/conftest.py.

Servers here are real BrightRun servers. Most SDK behaviour needs jobs but not
training, so ``idle_server`` runs a stand-in trainer that exits at once (jobs
fail within a second) and ``stuck_server`` one that never reports (one job holds
the only slot in PROVISIONING, the next ones stay QUEUED until cancelled). Real
training uses the ``tiny_model`` fixture and the ``training`` fixture's server.
``scripted_server`` runs a trainer that only sleeps: tests play its part with
``sdk_harness.Trainer`` (failures, pauses, escalations without training).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sdk_harness import TINY_JOB, FlakyProxy, RestartableServer, fake_trainer, sleeping_trainer

import brightrun

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent.parent / "examples" / "data"


def _server(tmp: Path, **settings: Any) -> RestartableServer:
    return RestartableServer(tmp / "brightrun-data", **settings).start()


@pytest.fixture(scope="session")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    """Jobs on this server fail at once (the trainer exits 3): cheap jobs for
    paging, errors and failed-job paths."""
    tmp = tmp_path_factory.mktemp("idle")
    server = _server(tmp, trainer_python=fake_trainer(tmp, behaviour="fail"), max_concurrent_jobs=4)
    yield server
    server.stop(kill_workers=True)


@pytest.fixture
def stuck_server(tmp_path: Path) -> Iterator[RestartableServer]:
    """One slot whose trainer never reports: the first job stays PROVISIONING,
    later ones QUEUED, until cancelled."""
    server = _server(tmp_path, trainer_python=fake_trainer(tmp_path, behaviour="hang"), max_concurrent_jobs=1)
    yield server
    server.stop(kill_workers=True)


@pytest.fixture(scope="session")
def scripted_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    """Jobs here are played by the test (``sdk_harness.Trainer``); quick
    automatic retries and a short stop grace keep recovery paths fast."""
    tmp = tmp_path_factory.mktemp("scripted")
    server = _server(
        tmp,
        trainer_python=sleeping_trainer(tmp),
        max_concurrent_jobs=16,
        stop_grace_seconds=1.0,
        initial_backoff_seconds=0.1,
        max_backoff_seconds=0.5,
    )
    yield server
    server.stop(kill_workers=True)


@pytest.fixture
def one_slot_server(tmp_path: Path) -> Iterator[RestartableServer]:
    """One slot and a sleeping trainer: the first job holds it, the rest queue."""
    server = _server(
        tmp_path,
        trainer_python=sleeping_trainer(tmp_path),
        max_concurrent_jobs=1,
        stop_grace_seconds=1.0,
        provisioning_buffer_seconds=60,
        default_job_duration_seconds=600,
    )
    yield server
    server.stop(kill_workers=True)


@pytest.fixture(scope="session")
def training_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    """A server with the real trainer, shared by the tests that train."""
    server = _server(tmp_path_factory.mktemp("training"), max_concurrent_jobs=2)
    yield server
    server.stop(kill_workers=True)


@pytest.fixture
def client(idle_server: RestartableServer) -> Iterator[brightrun.Client]:
    with brightrun.Client(idle_server.address) as c:
        yield c


@pytest.fixture
async def aclient(idle_server: RestartableServer) -> AsyncIterator[brightrun.AsyncClient]:
    async with brightrun.AsyncClient(idle_server.address) as c:
        yield c


@pytest.fixture(scope="session")
def chat_file() -> Path:
    return EXAMPLES / "support_chat.jsonl"


@pytest.fixture(scope="session")
def idle_dataset(idle_server: RestartableServer, chat_file: Path) -> brightrun.Dataset:
    with brightrun.Client(idle_server.address) as c:
        return c.datasets.upload(chat_file, name="idle-chat")


@pytest.fixture(scope="session")
def completed_job(training_server: RestartableServer, tiny_model: Path, chat_file: Path) -> Iterator[brightrun.Job]:
    """One real tiny training run to completion, shared by read-only tests (the
    handle stays bound to a client that is open for the whole session)."""
    with brightrun.Client(training_server.address) as c:
        ds = c.datasets.upload(chat_file)
        job = c.jobs.create(dataset=ds, base_model=str(tiny_model), name="completed-fixture", **TINY_JOB)
        job.wait(timeout=240)
        assert job.state is brightrun.JobState.COMPLETED, job.failure
        yield job


@pytest.fixture
def proxy(idle_server: RestartableServer) -> Iterator[FlakyProxy]:
    p = FlakyProxy(idle_server.address)
    yield p
    p.close()
