"""Real tiny training runs through the SDK and the CLI."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from sdk_harness import TINY_JOB, RestartableServer
from typer.testing import CliRunner

import brightrun
from brightrun import JobState, Stage, StageStatus
from brightrun.cli import app


def test_completed_job_end_to_end(completed_job: brightrun.Job) -> None:
    job = completed_job.reload()
    assert job.raise_for_status() is job
    assert [s.stage for s in job.stages] == [
        Stage.PROVISIONING,
        Stage.PREPROCESSING,
        Stage.MODEL_LOADING,
        Stage.TRAINING,
        Stage.FINALIZATION,
    ]
    assert all(s.status is StageStatus.SUCCEEDED and s.duration is not None for s in job.stages)
    assert job.stage("training") is not None
    assert job.progress.current_step == job.progress.total_steps == TINY_JOB["max_steps"]
    assert job.output is not None
    adapter = Path(job.output.adapter_path)
    assert (adapter / "adapter_config.json").is_file()
    assert job.output.final_eval_loss is not None
    assert job.output.duration is not None
    assert job.elapsed == job.output.duration
    assert job.cost.spend_usd > 0
    assert job.latest_checkpoint is not None

    history = job.metrics(page_size=7).to_list()
    assert [m.sequence for m in history] == list(range(1, job.last_metric_sequence + 1))
    assert all(m.time is not None and m.time.tzinfo is not None for m in history)
    assert list(job.stream_metrics()) == history
    middle = history[len(history) // 2].sequence
    assert list(job.stream_metrics(from_sequence=middle)) == history[middle - 1 :]
    # latest_metrics merges the newest value of every metric up to the last point.
    assert job.latest_metrics is not None
    assert job.latest_metrics.sequence == history[-1].sequence
    assert job.latest_metrics.eval_loss == history[-1].eval_loss == job.output.final_eval_loss
    events = job.events().to_list()
    assert events[-1].code == "JOB_COMPLETED"
    assert [e.code for e in job.stream_events(types=[brightrun.EventType.CHECKPOINT])] == ["CHECKPOINT_SAVED"]


@pytest.mark.slow
def test_live_job_with_subscribers_and_cli_watch(
    training_server: RestartableServer, tiny_model: Path, chat_file: Path
) -> None:
    """While a job trains: two async metric subscribers and an async watcher,
    plus ``brightrun jobs watch`` in another thread printing plain lines."""
    with brightrun.Client(training_server.address) as c:
        ds = c.datasets.upload(chat_file)
        job = c.jobs.create(dataset=ds, base_model=str(tiny_model), name="live", **TINY_JOB)

    cli: dict[str, Any] = {}

    def watch_in_cli() -> None:
        cli["result"] = CliRunner().invoke(
            app, ["--target", training_server.address, "jobs", "watch", job.id, "--interval", "1"]
        )

    thread = threading.Thread(target=watch_in_cli)
    thread.start()

    async def subscribe() -> tuple[list[brightrun.MetricPoint], list[brightrun.MetricPoint], list[JobState]]:
        async with brightrun.AsyncClient(training_server.address) as ac:
            handle = await ac.jobs.get(job.id)

            async def states() -> list[JobState]:
                return [s.state async for s in handle.watch(timeout=240)]

            a, b, s = await asyncio.gather(
                _collect(ac.jobs.stream_metrics(job.id)), _collect(handle.stream_metrics()), states()
            )
            return a, b, s

    first, second, states = asyncio.run(asyncio.wait_for(subscribe(), timeout=240))
    thread.join(240)

    assert first == second
    assert [m.sequence for m in first] == list(range(1, len(first) + 1))
    assert states[-1] is JobState.COMPLETED
    assert JobState.TRAINING in states

    result = cli["result"]
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "training: " in out  # a state line with the stage's sub-status
    assert "step " in out
    assert "loss " in out
    assert "spend $" in out
    assert f"✓ Job {job.id} completed in" in out
    assert "adapter: " in out


async def _collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


def test_a_real_continuation_from_a_completed_jobs_checkpoint(completed_job: brightrun.Job) -> None:
    """SPEC §6 through the SDK with the real trainer: continue a finished job
    from its last checkpoint for more steps, restarting warmup. The
    continuation starts at the checkpoint's step and is linked to the original."""
    (last, *_) = completed_job.checkpoints()
    assert last.step == TINY_JOB["max_steps"]
    more = TINY_JOB["max_steps"] + 4
    continuation = completed_job.resume_from_checkpoint(max_steps=more, lr_schedule="restart_warmup")
    assert continuation.lineage is not None
    assert continuation.lineage.resumed_from_checkpoint_id == last.id
    assert continuation.lineage.root_job_id == completed_job.id
    continuation.wait(timeout=240).raise_for_status()
    steps = [m.step for m in continuation.metrics().to_list() if m.train_loss is not None]
    assert steps == list(range(last.step + 1, more + 1)), "only the steps after the checkpoint are trained"
    assert continuation.output is not None
    assert (Path(continuation.output.adapter_path) / "adapter_config.json").is_file()
    assert continuation.lineage.chain_spend_usd >= continuation.cost.spend_usd
