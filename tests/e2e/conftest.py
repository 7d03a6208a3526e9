"""Fixtures of the fault tests: one real server per module, the reference run,
and datasets made for particular faults.

Every job of the exactness tests uses :data:`EXACT_CONFIG` (same seed, same
data), so each is compared with one uninterrupted run of it (``baseline``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from brightrun.v1 import job_pb2
from tests.conftest import EXAMPLES, ServerHandle, start_server, stop_server
from tests.e2e.harness import Api, eval_curve, final_curve

State = job_pb2.Job.State

#: Settings of every server these tests start: one torch thread per trainer
#: (the machine is shared), quick automatic retries, a short SIGTERM grace.
SERVER_SETTINGS: dict[str, object] = {
    "trainer_threads": 1,
    "initial_backoff_seconds": 0.2,
    "max_backoff_seconds": 2.0,
    "stop_grace_seconds": 10.0,
    "heartbeat_seconds": 1.0,
}
CHECKPOINT_INTERVAL = 5
MAX_STEPS = 40
#: The exactness configuration: 256 training examples in batches of 8 make 32
#: steps an epoch, so 40 steps cross an epoch boundary (a resume must restore
#: the data order of the next epoch too); dropout makes the RNG state matter.
EXACT_CONFIG = job_pb2.TrainingConfig(
    lora_rank=8,
    lora_alpha=16,
    lora_dropout=0.05,
    target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
    learning_rate=5e-3,
    epochs=2,
    batch_size=8,
    gradient_accumulation_steps=1,
    max_seq_length=512,
    warmup_ratio=0.1,
    checkpoint_interval_steps=CHECKPOINT_INTERVAL,
    max_steps=MAX_STEPS,
    seed=1234,
)


@dataclass
class Reference:
    """The uninterrupted run every interrupted one must reproduce exactly."""

    job: job_pb2.Job
    losses: dict[int, float]
    eval_losses: dict[int, float]


@dataclass
class E2E:
    handle: ServerHandle
    api: Api
    model: Path
    chat_dataset_id: str

    def create(self, config: job_pb2.TrainingConfig = EXACT_CONFIG, name: str = "") -> job_pb2.Job:
        return self.api.create(self.chat_dataset_id, str(self.model), config, name=name)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[E2E]:
    """A real server (SQLite, local executor, real trainers) shared by a module's tests."""
    handle = start_server(tmp_path_factory.mktemp("e2e"), max_concurrent_jobs=4, **SERVER_SETTINGS)
    api = Api.over(handle.channel())
    try:
        dataset = api.upload(EXAMPLES / "support_chat.jsonl")
        yield E2E(handle, api, tiny_model, dataset.id)
    finally:
        api.close()
        stop_server(handle)


@pytest.fixture(scope="module")
def baseline(e2e: E2E) -> Reference:
    job = e2e.create(name="reference")
    done = e2e.api.wait(job.id)
    assert done.state == State.STATE_COMPLETED, done.state_message
    points = e2e.api.metrics(job.id)
    losses = final_curve(points)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert {p.attempt for p in points} == {1}
    return Reference(done, losses, eval_curve(points))


# ---------------------------------------------------------------- datasets


def _sentences(rng: random.Random, n: int) -> str:
    from brightrun_trainer.tiny import builtin_corpus

    corpus = list(builtin_corpus(300, seed=7))
    return " ".join(rng.choice(corpus) for _ in range(n))


def write_long_conversations(path: Path, count: int = 48, seed: int = 0) -> Path:
    """Chat JSONL whose examples all fill a 512-token window with trained tokens
    (a short question, a reply of about 600 tokens with the tiny tokenizer)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            messages = [
                {"role": "user", "content": f"Ticket {i}: " + _sentences(rng, 2)},
                {"role": "assistant", "content": _sentences(rng, 60)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_truncated_away(path: Path, count: int = 24, seed: int = 1) -> Path:
    """Structurally valid chat JSONL the trainer cannot use: each system prompt is
    longer than 512 tokens, so every assistant token is cut off by the window."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            messages = [
                {"role": "system", "content": _sentences(rng, 80)},
                {"role": "user", "content": f"Question {i}: " + _sentences(rng, 1)},
                {"role": "assistant", "content": _sentences(rng, 2)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
