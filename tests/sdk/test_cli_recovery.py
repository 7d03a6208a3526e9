"""The CLI's recovery, queue and usage commands against real servers whose
trainer the test plays, and the views that show recovering, paused and
waiting jobs (pure rendering, no server)."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sdk_harness import RestartableServer, Trainer, wait_for
from typer.testing import CliRunner

import brightrun
from brightrun import JobState
from brightrun.cli import app
from brightrun.cli.view import WatchState, job_details, plain_status, render, status_banner, summary_lines
from brightrun.v1 import job_pb2

runner = CliRunner()
JUSTIFICATION = (
    "The client's launch review moved up to Thursday and this adapter has to be evaluated before it; "
    "every other job here can wait a day."
)
_SEEDS = itertools.count(5000)


def run(address: str, *args: str) -> Any:
    return runner.invoke(app, ["--target", address, *args])


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.fixture
def scripted(scripted_server: RestartableServer, chat_file: Path) -> Iterator[tuple[brightrun.Client, list[Trainer]]]:
    """A client of the scripted server and the trainers a test attached; every
    unfinished job is cancelled afterwards."""
    trainers: list[Trainer] = []
    with brightrun.Client(scripted_server.address) as client:
        yield client, trainers
        for job in client.jobs.list(page_size=200):
            if not job.is_terminal and job.state is not JobState.CANCELLING:
                with contextlib.suppress(brightrun.ApiError):
                    job.cancel(reason="testing")
    for trainer in trainers:
        trainer.close()


def start(client: brightrun.Client, trainers: list[Trainer], chat_file: Path, **fields: Any) -> brightrun.Job:
    ds = client.datasets.upload(chat_file)
    job = client.jobs.create(dataset=ds, base_model="scripted/model", force=True, seed=next(_SEEDS), **fields)
    trainers.append(Trainer(client.target, job.id))
    return job


def test_fixes_report_checkpoints_retry_and_continuation(
    scripted: tuple[brightrun.Client, list[Trainer]], chat_file: Path
) -> None:
    client, trainers = scripted
    address = client.target
    job = start(client, trainers, chat_file, batch_size=8)
    trainer = trainers[-1]
    trainer.to_training()
    trainer.steps(1, 3)
    trainer.checkpoint(2)
    trainer.fail("OutOfMemoryError", "CUDA out of memory. Tried to allocate 1.50 GiB", step=3)
    job.wait(timeout=30)

    fixes = run(address, "jobs", "fixes", job.id)
    assert fixes.exit_code == 0, fixes.output
    text = flat(fixes.stdout)
    for expected in ("out of memory", "reduce_batch_size", "batch_size=4", "gradient_accumulation_steps=2"):
        assert expected in text
    assert "experimental" in text
    assert f"brightrun jobs retry {job.id} --suggested" in text
    as_json = json.loads(run(address, "jobs", "fixes", job.id, "--json").stdout)
    assert as_json["failure_class"] == "out_of_memory"
    assert as_json["fixes"][0]["id"] == "reduce_batch_size"

    report = run(address, "jobs", "report", job.id)
    assert report.exit_code == 0, report.output
    text = flat(report.stdout)
    for expected in ("out of memory", "step 3", "what you can do", f"brightrun jobs retry {job.id} --suggested"):
        assert expected in text
    assert json.loads(run(address, "jobs", "report", job.id, "--json").stdout)["job_id"] == job.id

    checkpoints = run(address, "jobs", "checkpoints", job.id)
    assert "ckpt_" in checkpoints.stdout
    assert json.loads(run(address, "jobs", "checkpoints", job.id, "--json").stdout)[0]["step"] == 2

    both = run(address, "jobs", "retry", job.id, "--suggested", "--fix", "quantize_4bit")
    assert both.exit_code == 2
    retried = run(address, "jobs", "retry", job.id, "--suggested")
    assert retried.exit_code == 0, retried.output
    assert "(Retry #1)" in retried.stdout
    assert "fixes applied: reduce_batch_size" in retried.stdout
    combined = run(
        address, "jobs", "retry", job.id, "--fix", "quantize_4bit", "--fix", "gradient_checkpointing", "--json"
    )
    assert combined.exit_code == 0, combined.output
    data = json.loads(combined.stdout)
    assert data["lineage"]["applied_fixes"] == ["quantize_4bit", "gradient_checkpointing"]
    shown = run(address, "jobs", "show", data["id"])
    assert f"retry of {job.id} (retry #2)" in flat(shown.stdout)

    locked = run(address, "jobs", "resume-from-checkpoint", job.id, "--set", "lora_rank=8")
    assert locked.exit_code == 2
    assert "locked on resume" in flat(locked.output)
    bad_mode = run(address, "jobs", "resume-from-checkpoint", job.id, "--lr-schedule", "sideways")
    assert bad_mode.exit_code == 2
    continued = run(
        address, "jobs", "resume-from-checkpoint", job.id, "--set", "batch_size=2", "--lr-schedule", "restart_warmup"
    )
    assert continued.exit_code == 0, continued.output
    assert f"continues {job.id} from ckpt_" in flat(continued.stdout)


def test_retry_and_continuation_take_force(scripted: tuple[brightrun.Client, list[Trainer]], chat_file: Path) -> None:
    client, trainers = scripted
    address = client.target
    job = start(client, trainers, chat_file, batch_size=8)
    trainer = trainers[-1]
    trainer.to_training()
    trainer.checkpoint(2)
    trainer.fail("OutOfMemoryError", "CUDA out of memory", step=2)
    job.wait(timeout=30)
    for command in (["jobs", "retry", job.id], ["jobs", "resume-from-checkpoint", job.id, "--set", "batch_size=4"]):
        first = run(address, *command, "--json")
        assert first.exit_code == 0, first.output
        duplicate = run(address, *command)
        assert duplicate.exit_code == 1
        assert "(DUPLICATE_JOB)" in flat(duplicate.stderr)
        assert json.loads(first.stdout)["id"] in flat(duplicate.stderr)
        forced = run(address, *command, "--force", "--json")
        assert forced.exit_code == 0, forced.output
        assert json.loads(forced.stdout)["id"] != json.loads(first.stdout)["id"]


def test_dataset_errors_exit_1_with_what_to_do(
    scripted: tuple[brightrun.Client, list[Trainer]], chat_file: Path
) -> None:
    client, trainers = scripted
    job = start(client, trainers, chat_file)
    trainers[-1].attempt.stage(2)
    trainers[-1].fail("DatasetFormatError", "conversations[3]: malformed", stage=2)
    job.wait(timeout=30)
    result = run(client.target, "jobs", "retry", job.id, "--suggested")
    assert result.exit_code == 1
    assert "brightrun datasets validate" in flat(result.stderr)
    assert "Traceback" not in result.output
    fixes = run(client.target, "jobs", "fixes", job.id)
    assert "needs your action" in flat(fixes.stdout)


def test_wait_exits_7_on_a_decision_and_decide_answers_it(
    scripted: tuple[brightrun.Client, list[Trainer]], chat_file: Path
) -> None:
    client, trainers = scripted
    address = client.target
    job = start(client, trainers, chat_file, recovery_policy=brightrun.RecoveryPolicy(max_system_retries=0))
    trainers[-1].kill()
    wait_for(lambda: job.reload().state is JobState.AWAITING_DECISION, timeout=30)

    waited = run(address, "jobs", "wait", job.id, "--timeout", "30")
    assert waited.exit_code == 7, waited.output
    text = flat(waited.stderr)
    assert "AWAITING DECISION" in text
    assert f"brightrun jobs decide {job.id} keep_trying|switch_to_on_demand|cancel" in text
    as_json = run(address, "jobs", "wait", job.id, "--json", "-q")
    assert as_json.exit_code == 7
    assert json.loads(as_json.stdout)["state"] == "awaiting_decision"
    patient = run(address, "jobs", "wait", job.id, "--timeout", "1", "--wait-for-decision", "-q")
    assert patient.exit_code == 4, "with --wait-for-decision it waits (here until the timeout)"

    shown = flat(run(address, "jobs", "show", job.id).stdout)
    assert "AWAITING_DECISION" in shown or "AWAITING DECISION" in shown
    assert "choose: keep_trying, switch_to_on_demand, cancel" in shown
    assert "interrupted 1× (0 auto-recovered)" in shown  # noqa: RUF001 - the times sign the CLI prints

    bad = run(address, "jobs", "decide", job.id, "sideways")
    assert bad.exit_code == 2
    decided = run(address, "jobs", "decide", job.id, "cancel")
    assert decided.exit_code == 0, decided.output
    assert "CANCELLED" in decided.stdout
    again = run(address, "jobs", "decide", job.id, "keep_trying")
    assert again.exit_code == 1
    assert "JOB_STATE_CONFLICT" in again.stderr
    assert run(address, "jobs", "wait", job.id, "-q").exit_code == 3

    help_text = runner.invoke(app, ["jobs", "wait", "--help"]).stdout
    for code in ("0", "1", "2", "3", "4", "5", "6", "7"):
        assert f"{code}  " in help_text


def test_pause_resume_and_on_demand(scripted: tuple[brightrun.Client, list[Trainer]], chat_file: Path) -> None:
    client, trainers = scripted
    address = client.target
    job = start(client, trainers, chat_file)
    trainer = trainers[-1]
    trainer.to_training()
    trainer.steps(1, 4)
    paused = run(address, "jobs", "pause", job.id)
    assert paused.exit_code == 0, paused.output
    assert "PAUSING" in paused.stdout
    trainer.checkpoint(4)
    trainer.stopped(4)
    wait_for(lambda: job.reload().state is JobState.PAUSED)
    shown = flat(run(address, "jobs", "show", job.id).stdout)
    assert "PAUSED" in shown
    assert f"resume with: brightrun jobs resume {job.id}" in shown
    not_training = run(address, "jobs", "pause", job.id)
    assert not_training.exit_code == 0  # pausing a paused job changes nothing
    resumed = run(address, "jobs", "resume", job.id, "--gpu-type", "a100-80gb", "--pricing", "on_demand")
    assert resumed.exit_code == 0, resumed.output
    assert "on A100-80GB on_demand" in resumed.stdout
    refused = run(address, "jobs", "resume", job.id)
    assert refused.exit_code == 1
    assert "only a paused job can be resumed" in flat(refused.stderr)
    other = start(client, trainers, chat_file)
    switched = run(address, "jobs", "on-demand", other.id)
    assert switched.exit_code == 0, switched.output
    assert "$7.99/h" in switched.stdout


def test_queue_usage_export_and_bulk_cancel(
    one_slot_server: RestartableServer, chat_file: Path, tmp_path: Path
) -> None:
    address = one_slot_server.address
    with brightrun.Client(address) as client:
        ds = client.datasets.upload(chat_file)
        running = client.jobs.create(dataset=ds, base_model="scripted/model", name="running", force=True)
        trainer = Trainer(address, running.id)
        waiting = [
            client.jobs.create(dataset=ds, base_model="scripted/model", name=f"waiting {i}", force=True)
            for i in range(3)
        ]
    try:
        shown = run(address, "queue", "show")
        assert shown.exit_code == 0, shown.output
        text = flat(shown.stdout)
        assert "3 waiting, 1 running" in text
        assert "local 1/1" in text
        for job in waiting:
            assert job.id in text
        assert json.loads(run(address, "queue", "show", "--json").stdout)["stats"]["depth"] == 3
        job_text = flat(run(address, "jobs", "show", waiting[2].id).stdout)
        assert "position 3, expected start" in job_text

        short = run(address, "queue", "promote", waiting[2].id, "--reason", "client_deadline", "--justification", "x")
        assert short.exit_code == 2
        promoted = run(
            address, "queue", "promote", waiting[2].id, "--reason", "client_deadline", "--justification", JUSTIFICATION
        )
        assert promoted.exit_code == 0, promoted.output
        assert f"promoted {waiting[2].id} to the front" in promoted.stdout
        assert f"delays {waiting[0].id}" in promoted.stdout
        assert "↑promoted" in run(address, "queue", "show").stdout
        audit = run(address, "queue", "audit")
        assert audit.exit_code == 0
        assert waiting[2].id in audit.stdout
        assert "client deadline" in audit.stdout
        watched = run(address, "queue", "watch", "--timeout", "1", "--json")
        assert watched.exit_code == 0, watched.output
        first = json.loads(watched.stdout.splitlines()[0])
        assert first["queued"][0]["job_id"] == waiting[2].id
        plain_watch = run(address, "queue", "watch", "--timeout", "1")
        assert "3 waiting, 1 running" in plain_watch.stdout

        usage = run(address, "usage", "--months", "2")
        assert usage.exit_code == 0, usage.output
        assert "no quota" in usage.stdout
        assert len(json.loads(run(address, "usage", "--json").stdout)["months"]) == 6

        out_file = tmp_path / "jobs.csv"
        exported = run(address, "jobs", "export", "-o", str(out_file), "--order-by", "name")
        assert exported.exit_code == 0, exported.output
        assert "wrote" in exported.stderr
        rows = list(csv.DictReader(io.StringIO(out_file.read_bytes().decode())))
        assert [r["name"] for r in rows] == ["running", "waiting 0", "waiting 1", "waiting 2"]
        to_stdout = run(address, "jobs", "export", "--state", "queued")
        assert [r["id"] for r in csv.DictReader(io.StringIO(to_stdout.stdout))] == [w.id for w in reversed(waiting)]

        nothing = run(address, "jobs", "bulk-cancel", "--reason", "testing")
        assert nothing.exit_code == 2
        cancelled = run(address, "jobs", "bulk-cancel", running.id, "--state", "queued", "--reason", "testing", "-y")
        assert cancelled.exit_code == 0, cancelled.output
        assert "4 cancelled" in cancelled.stderr
    finally:
        trainer.close()


# ---------------------------------------------------------------- views (no server)


def _job(**fields: Any) -> brightrun.Job:
    message = job_pb2.Job(id="job_1", name="demo", **fields)
    return brightrun.Job.from_proto(message)


def test_views_say_what_a_waiting_job_needs() -> None:
    decision = job_pb2.PendingDecision(
        reason="3 automatic recoveries in a row failed",
        choices=[job_pb2.RECOVERY_CHOICE_KEEP_TRYING, job_pb2.RECOVERY_CHOICE_CANCEL],
    )
    waiting = _job(state=job_pb2.Job.STATE_AWAITING_DECISION, decision=decision)
    banner = status_banner(waiting)
    assert banner is not None
    assert "AWAITING DECISION 3 automatic recoveries in a row failed" in banner.plain
    assert "brightrun jobs decide job_1 keep_trying|cancel" in banner.plain
    assert "decide with" in plain_status(WatchState(waiting))
    assert any("AWAITING DECISION" in text for text, _ in summary_lines(waiting))

    recovering = _job(
        state=job_pb2.Job.STATE_RECOVERING,
        state_message="Worker lost at step 10; resuming from checkpoint at step 5 in 2.0s",
        recovery=job_pb2.RecoveryStatus(failure_class=job_pb2.FAILURE_CLASS_SPOT_INTERRUPTION),
    )
    text = plain_status(WatchState(recovering))
    assert "RECOVERING from spot interruption: Worker lost at step 10" in text

    paused = _job(state=job_pb2.Job.STATE_PAUSED, state_message="Paused; resumes from the checkpoint at step 5")
    banner = status_banner(paused)
    assert banner is not None
    assert "resume with: brightrun jobs resume job_1" in banner.plain
    assert status_banner(_job(state=job_pb2.Job.STATE_TRAINING)) is None

    console_text = _render_text(render(WatchState(paused)))
    assert "PAUSED" in console_text


def test_views_show_cost_against_the_estimate_and_interruptions() -> None:
    cost = job_pb2.JobCost(
        spend_usd=2.7,
        hourly_rate_usd=2.49,
        percent_of_estimate=112.5,
        alert=job_pb2.COST_ALERT_OVER_ESTIMATE,
        estimate_usd=job_pb2.ValueRange(low=1.2, high=2.4),
    )
    interruptions = [
        job_pb2.Interruption(attempt=1, recovered=True, cost_overhead_usd=0.02),
        job_pb2.Interruption(attempt=2, recovered=True, cost_overhead_usd=0.01),
    ]
    job = _job(state=job_pb2.Job.STATE_TRAINING, cost=cost, interruptions=interruptions)
    text = plain_status(WatchState(job))
    assert "(112% of est.) OVER THE ESTIMATE" in text
    assert "interrupted 2× (auto-recovered), $0.03 overhead" in text  # noqa: RUF001
    details = _render_text(job_details(job))
    assert "112% of the estimate ($1.20 to $2.40)" in details
    assert "OVER THE ESTIMATE" in details
    assert "interrupted 2× (auto-recovered)" in details  # noqa: RUF001
    warning = _job(
        cost=job_pb2.JobCost(percent_of_estimate=85, alert=job_pb2.COST_ALERT_WARNING, estimate_usd=cost.estimate_usd)
    )
    assert "above 80% of the estimate" in _render_text(render(WatchState(warning)))

    queued = _job(
        state=job_pb2.Job.STATE_QUEUED,
        queue=job_pb2.QueueInfo(position=2, confidence="medium"),
        warnings=["spot availability is low for H100-80GB"],
    )
    details = _render_text(job_details(queued))
    assert "position 2" in details
    assert "(medium confidence)" in details
    assert "spot availability is low" in details
    provisioning = _job(
        state=job_pb2.Job.STATE_PROVISIONING,
        provisioning=job_pb2.ProvisioningStatus(
            attempt=3, max_attempts=12, last_outcome=job_pb2.PROVISIONING_OUTCOME_SPOT_UNAVAILABLE, pool="cloud"
        ),
    )
    banner = status_banner(provisioning)
    assert banner is not None
    assert "provisioning: attempt 3/12, pool cloud, last: spot unavailable" in banner.plain


def _render_text(renderable: Any) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return flat(console.file.getvalue())  # type: ignore[attr-defined]
