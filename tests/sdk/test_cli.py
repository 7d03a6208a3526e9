"""The ``brightrun`` CLI against real servers (typer's CliRunner; output is not a
terminal, so views print plain lines)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from sdk_harness import RestartableServer
from typer.testing import CliRunner

import brightrun
from brightrun.cli import app
from brightrun.cli.gates import evaluate, metric_value, parse_gate

runner = CliRunner()


def run(address: str, *args: str) -> Any:
    return runner.invoke(app, ["--target", address, *args])


def flat(text: str) -> str:
    """Output with rich's box drawing and line wrapping undone."""
    return " ".join(text.replace("│", " ").split())


# ---------------------------------------------------------------- jobs wait


def test_wait_completed_job_with_gates(training_server: RestartableServer, completed_job: brightrun.Job) -> None:
    address, job = training_server.address, completed_job
    ok = run(address, "jobs", "wait", job.id, "--require", "eval_loss<100", "--require", "spend_usd>=0")
    assert ok.exit_code == 0, ok.output
    assert "completed" in ok.stderr
    assert "ok   eval_loss < 100" in ok.stderr

    gated = run(address, "jobs", "wait", job.id, "--require", "eval_loss<0.001", "-q")
    assert gated.exit_code == 5
    assert gated.stdout == ""

    as_json = run(address, "jobs", "wait", job.id, "--json", "-q")
    assert as_json.exit_code == 0
    data = json.loads(as_json.stdout)
    assert data["id"] == job.id
    assert data["state"] == "completed"
    assert data["output"]["adapter_path"] == job.output.adapter_path  # type: ignore[union-attr]


def test_wait_failed_job_exits_1(idle_server: RestartableServer, idle_dataset: brightrun.Dataset) -> None:
    with brightrun.Client(idle_server.address) as c:
        job = c.jobs.create(dataset=idle_dataset, base_model="some/model", force=True)
    result = run(idle_server.address, "jobs", "wait", job.id, "--timeout", "60", "--require", "eval_loss<1")
    assert result.exit_code == 1, result.output
    assert "failed" in result.stderr


def test_wait_cancelled_and_timeout(stuck_server: RestartableServer, chat_file: Path) -> None:
    with brightrun.Client(stuck_server.address) as c:
        ds = c.datasets.upload(chat_file)
        running = c.jobs.create(dataset=ds, base_model="some/model", force=True)
        queued = c.jobs.create(dataset=ds, base_model="some/model", force=True)
    timeout = run(stuck_server.address, "jobs", "wait", running.id, "--timeout", "1", "--json")
    assert timeout.exit_code == 4, timeout.output
    assert "timeout" in timeout.stderr
    assert json.loads(timeout.stdout)["id"] == running.id

    cancel = run(stuck_server.address, "jobs", "cancel", queued.id, "--reason", "testing", "--note", "from the CLI")
    assert cancel.exit_code == 0, cancel.output
    cancelled = run(stuck_server.address, "jobs", "wait", queued.id)
    assert cancelled.exit_code == 3
    assert "cancelled" in cancelled.stderr


def test_wait_usage_and_follow_errors(idle_server: RestartableServer) -> None:
    bad_gate = run(idle_server.address, "jobs", "wait", "job_x", "--require", "eval_loss<<1")
    assert bad_gate.exit_code == 2
    assert "cannot read gate 'eval_loss<<1'" in flat(bad_gate.output)
    unknown_metric = run(idle_server.address, "jobs", "wait", "job_x", "--require", "vibes>1")
    assert unknown_metric.exit_code == 2
    assert "unknown metric 'vibes'" in flat(unknown_metric.output)
    missing = run(idle_server.address, "jobs", "wait", "job_missing")
    assert missing.exit_code == 6
    assert "error: job 'job_missing' not found (JOB_NOT_FOUND)" in missing.stderr


def test_gates() -> None:
    job = brightrun.Job.from_proto(brightrun.Job().to_proto())
    assert metric_value(job, "eval_loss") is None
    with pytest.raises(ValueError, match="expected METRIC OP NUMBER"):
        parse_gate("eval_loss")
    with pytest.raises(ValueError, match="cannot read gate"):
        parse_gate("eval_loss < low")
    assert parse_gate("spend_usd<=1e-2").threshold == 0.01
    gate = parse_gate(" eval_loss <= 0.5 ")
    assert (gate.metric, gate.op, gate.threshold) == ("eval_loss", "<=", 0.5)
    [result] = evaluate(job, [gate])
    assert not result.ok  # a missing value never passes
    assert "unavailable" in result.describe()


# ---------------------------------------------------------------- errors


def test_errors_are_one_line_without_traceback(idle_server: RestartableServer, idle_dataset: brightrun.Dataset) -> None:
    missing = run(idle_server.address, "jobs", "show", "job_nope")
    assert missing.exit_code == 1
    assert missing.stderr == "error: job 'job_nope' not found (JOB_NOT_FOUND)\n"
    assert "Traceback" not in missing.output

    invalid = run(
        idle_server.address,
        "jobs", "create", "--dataset", idle_dataset.id, "--base-model", "m",
        "--set", "lora_rank=99", "--set", "batch_size=3",
    )  # fmt: skip
    assert invalid.exit_code == 1
    line = invalid.stderr.replace("\n", " ")
    assert line.startswith("error: invalid request: ")
    assert "overrides.lora_rank: must be between 4 and 64, got 99" in line
    assert "overrides.batch_size: must be one of 1, 2, 4, 8, got 3" in line
    assert "(INVALID_ARGUMENT)" in line

    typo = run(idle_server.address, "jobs", "create", "--dataset", "ds", "--base-model", "m", "--set", "lora_rnk=8")
    assert typo.exit_code == 2
    assert "did you mean 'lora_rank'" in flat(typo.output)


def test_unreachable_server_says_so() -> None:
    result = run("127.0.0.1:1", "datasets", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach the BrightRun server at 127.0.0.1:1")
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- jobs


def test_jobs_create_list_show(idle_server: RestartableServer, idle_dataset: brightrun.Dataset) -> None:
    address = idle_server.address
    created = run(
        address,
        "jobs", "create", "--dataset", idle_dataset.id, "--base-model", "some/model", "--force",
        "--preset", "aggressive", "--set", "lora_rank=8", "--set", "target_modules=q_proj,v_proj",
        "--set", "quantization=nf4", "--label", "suite=cli", "--pricing", "on-demand",
        "--max-duration", "1h30m", "--name", "from-cli", "--json",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    job = json.loads(created.stdout)
    assert job["preset"] == "aggressive"
    assert job["config"]["lora_rank"] == 8
    assert job["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert job["config"]["quantization"] == "nf4"
    assert job["compute"]["pricing_tier"] == "on_demand"
    assert job["compute"]["max_duration"] == 5400.0
    assert job["labels"] == {"suite": "cli"}

    listed = run(address, "jobs", "list", "--filter", 'labels.suite = "cli"', "--json")
    assert listed.exit_code == 0, listed.output
    assert [j["id"] for j in json.loads(listed.stdout)] == [job["id"]]

    table = run(address, "jobs", "list", "--filter", 'labels.suite = "cli"')
    assert job["id"] in table.stdout
    assert "from-cli" in table.stdout

    shown = run(address, "jobs", "show", job["id"])
    assert shown.exit_code == 0
    for text in ("from-cli", "aggressive (custom)", "lora_rank", "on_demand"):
        assert text in shown.stdout

    bad_state = run(address, "jobs", "list", "--state", "sleeping")
    assert bad_state.exit_code == 2


def test_jobs_show_watch_metrics_events_of_a_trained_job(
    training_server: RestartableServer, completed_job: brightrun.Job
) -> None:
    address, job = training_server.address, completed_job
    shown = run(address, "jobs", "show", job.id)
    assert shown.exit_code == 0
    for text in ("COMPLETED", "stages", "training", "latest metrics", "adapter", job.output.adapter_path):  # type: ignore[union-attr]
        assert text in flat(shown.stdout)

    watched = run(address, "jobs", "watch", job.id)
    assert watched.exit_code == 0, watched.output
    assert f"✓ Job {job.id} completed in" in watched.stdout
    assert "adapter: " in watched.stdout
    assert "step 20/20 (100%)" in watched.stdout

    csv_out = run(address, "jobs", "metrics", job.id, "--csv")
    assert csv_out.exit_code == 0
    rows = csv_out.stdout.strip().splitlines()
    assert rows[0].startswith("sequence,attempt,step,epoch,time,train_loss,eval_loss")
    assert len(rows) == 1 + job.last_metric_sequence

    followed = run(address, "jobs", "metrics", job.id, "--follow", "--json")
    points = [json.loads(line) for line in followed.stdout.splitlines()]
    assert [p["sequence"] for p in points] == list(range(1, job.last_metric_sequence + 1))

    table = run(address, "jobs", "metrics", job.id)
    assert "TRAIN LOSS" in table.stdout

    events = run(address, "jobs", "events", job.id, "--type", "status")
    assert events.exit_code == 0
    assert "JOB_COMPLETED" in events.stdout
    searched = run(address, "jobs", "events", job.id, "--query", "checkpoint", "--json")
    codes = {json.loads(line)["code"] for line in searched.stdout.splitlines()}
    assert "CHECKPOINT_SAVED" in codes
    exported = run(address, "jobs", "events", job.id, "--csv")
    rows = list(csv.reader(io.StringIO(exported.stdout)))
    assert rows[0] == ["sequence", "time", "type", "code", "message", "attempt", "payload"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, job.last_event_sequence + 1))
    assert json.loads(rows[-1][6]) is not None


# ---------------------------------------------------------------- datasets


def test_datasets_commands(idle_server: RestartableServer, chat_file: Path, tmp_path: Path) -> None:
    address = idle_server.address
    uploaded = run(address, "datasets", "upload", str(chat_file), "--name", "cli-upload", "--json")
    assert uploaded.exit_code == 0, uploaded.output
    ds = json.loads(uploaded.stdout)
    assert ds["state"] == "ready"
    assert ds["name"] == "cli-upload"

    table = run(address, "datasets", "upload", str(chat_file), "--name", "cli-upload")
    assert "READY" in table.stdout
    assert "quality" in table.stdout

    listed = run(address, "datasets", "list", "--filter", 'name = "cli-upload"', "--json")
    assert {d["name"] for d in json.loads(listed.stdout)} == {"cli-upload"}
    shown = run(address, "datasets", "show", ds["id"])
    assert ds["id"] in shown.stdout

    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    invalid = run(address, "datasets", "upload", str(broken))
    assert invalid.exit_code == 1
    assert "critical error" in invalid.stderr

    deleted = run(address, "datasets", "delete", ds["id"], "--yes")
    assert deleted.exit_code == 0
    gone = run(address, "datasets", "show", ds["id"])
    assert gone.exit_code == 1
    assert "DATASET_NOT_FOUND" in gone.stderr

    missing_file = run(address, "datasets", "upload", str(tmp_path / "nope.jsonl"))
    assert missing_file.exit_code == 2


def test_datasets_validate_uses_the_validation_engine(chat_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("brightrun.validation.cli", reason="brightrun.validation.cli is not there yet")
    ok = runner.invoke(app, ["datasets", "validate", str(chat_file), "--json"])
    assert ok.exit_code == 0, ok.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    bad = runner.invoke(app, ["datasets", "validate", str(broken)])
    assert bad.exit_code == 1


def test_version_and_help() -> None:
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0
    assert version.stdout.startswith("brightrun ")
    help_text = runner.invoke(app, ["jobs", "wait", "--help"])
    for code in ("0", "1", "2", "3", "4", "5", "6"):
        assert f"{code}  " in help_text.stdout


def test_server_command_needs_the_server_extra_message() -> None:
    """The server command imports the server lazily (here it is installed, so
    only check that --help works without starting anything)."""
    result = runner.invoke(app, ["server", "--help"])
    assert result.exit_code == 0
    assert "--max-concurrent-jobs" in result.stdout


def test_jobs_estimate(idle_server: RestartableServer, idle_dataset: brightrun.Dataset) -> None:
    result = run(
        idle_server.address,
        "jobs", "estimate", "--base-model", "meta-llama/Llama-3.1-8B", "--dataset", idle_dataset.id,
        "--gpu-type", "A10G-24GB", "--set", "batch_size=8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = flat(result.stdout)
    assert "OOM risk HIGH" in text
    assert "suggested fixes" in text
    assert "cost spot" in text
    as_json = run(idle_server.address, "jobs", "estimate", "--base-model", "meta-llama/Llama-3.2-1B", "--json")
    assert json.loads(as_json.stdout)["oom_risk"] == "low"
    refused = run(
        idle_server.address,
        "jobs", "create", "--dataset", idle_dataset.id, "--base-model", "meta-llama/Llama-3.1-8B",
        "--gpu-type", "A10G-24GB", "--set", "batch_size=8",
    )  # fmt: skip
    assert refused.exit_code == 1
    assert "(OOM_RISK_HIGH)" in flat(refused.stderr)


_BLOCKED_RUN = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: import fails, find_spec says None
sys.argv = ["brightrun", *{args!r}]
from brightrun.cli import main
main()
"""


@pytest.mark.parametrize(
    ("blocked", "args", "expected"),
    [
        (["brightrun_server"], ["server"], "pip install 'brightrun[server]'"),
        (["brightrun_trainer", "torch"], ["demo"], "pip install 'brightrun[all]'"),
    ],
)
def test_server_and_demo_name_the_missing_extra(blocked: list[str], args: list[str], expected: str) -> None:
    import subprocess
    import sys

    code = _BLOCKED_RUN.format(blocked=set(blocked), args=args)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert expected in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_datasets_errors_and_revalidate(idle_server: RestartableServer, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    with brightrun.Client(idle_server.address) as c:
        ds = c.datasets.upload(broken)
    listed = run(idle_server.address, "datasets", "errors", ds.id, "--context")
    assert listed.exit_code == 0, listed.output
    assert "malformed_json" in listed.stdout
    assert "critical" in listed.stdout
    as_csv = run(idle_server.address, "datasets", "errors", ds.id, "--csv")
    assert as_csv.exit_code == 0
    assert as_csv.stdout.splitlines()[0].count(",") >= 3
    as_json = run(idle_server.address, "datasets", "errors", ds.id, "--json", "--critical-only")
    assert all(json.loads(line)["severity"] == "critical" for line in as_json.stdout.splitlines())
    shown = run(idle_server.address, "datasets", "show", ds.id)
    assert "readiness" in shown.stdout
    revalidated = run(idle_server.address, "datasets", "revalidate", ds.id)
    assert revalidated.exit_code == 1  # still invalid
    bad_order = run(idle_server.address, "datasets", "errors", ds.id, "--order", "random")
    assert bad_order.exit_code == 2


def test_cli_force_description_query(stuck_server: RestartableServer, chat_file: Path) -> None:
    with brightrun.Client(stuck_server.address) as c:
        ds = c.datasets.upload(chat_file)
    base = ["jobs", "create", "--dataset", ds.id, "--base-model", "some/model", "--json"]
    first = run(stuck_server.address, *base, "--description", "the cli one")
    assert first.exit_code == 0, first.output
    duplicate = run(stuck_server.address, *base)
    assert duplicate.exit_code == 1
    assert "(DUPLICATE_JOB)" in flat(duplicate.stderr)
    forced = run(stuck_server.address, *base, "--force")
    assert forced.exit_code == 0, forced.output
    found = run(stuck_server.address, "jobs", "list", "--query", "the cli one", "--json")
    assert [j["id"] for j in json.loads(found.stdout)] == [json.loads(first.stdout)["id"]]
