"""Fixtures of the durability tests: restartable real server processes (with
their trainers cleaned up afterwards) and the small training configuration
every job here uses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from brightrun.v1 import job_pb2
from tests.conftest import EXAMPLES
from tests.durability.harness import ServerProcess, kill_trainers

#: Settings of every server these tests start: one torch thread per trainer
#: (the machine is shared), heartbeats every second, quick automatic retries.
SERVER_SETTINGS: dict[str, str] = {
    "trainer_threads": "1",
    "heartbeat_seconds": "1",
    "initial_backoff_seconds": "0.2",
    "max_backoff_seconds": "2",
    "stop_grace_seconds": "10",
}
MAX_STEPS = 100
CHECKPOINT_INTERVAL = 25
#: Conversations in the datasets of these tests (an epoch is 47 steps of 2).
EXAMPLES_PER_DATASET = 100
#: Small enough that ten jobs, five at a time, train in about a minute on two
#: cores (most of it starting the trainers), long enough to interrupt: several
#: seconds of training per job.
SMALL_CONFIG = job_pb2.TrainingConfig(
    lora_rank=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj"],
    epochs=3,
    batch_size=2,
    max_seq_length=512,
    max_steps=MAX_STEPS,
    checkpoint_interval_steps=CHECKPOINT_INTERVAL,
    validation_split=0.05,
    seed=1,
)

ServerFactory = Callable[..., ServerProcess]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first conversations of the example chat data: quick to tokenize in every trainer."""
    lines = (EXAMPLES / "support_chat.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path_factory.mktemp("durability-data") / "support_chat_small.jsonl"
    path.write_text("".join(lines[:EXAMPLES_PER_DATASET]), encoding="utf-8")
    return path


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerFactory]:
    """Makes (unstarted) server processes; kills them and their trainers afterwards."""
    made: list[ServerProcess] = []

    def make(data_dir: Path | None = None, **settings: object) -> ServerProcess:
        name = f"server{len(made)}"
        merged = {**SERVER_SETTINGS, **{k: str(v) for k, v in settings.items()}}
        server = ServerProcess(data_dir or tmp_path / name / "data", tmp_path / name / "logs", merged)
        made.append(server)
        return server

    yield make
    for server in made:
        server.kill()
        kill_trainers(server.data_dir)
