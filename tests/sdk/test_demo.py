"""``brightrun demo``: its server lifecycle, and the whole command end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import brightrun
from brightrun.cli.demo import DEMO_CONFIG, DemoServer, find_example_dataset


def test_demo_finds_the_example_dataset() -> None:
    found = find_example_dataset()
    assert found is not None
    assert found.name == "support_chat.jsonl"


def test_demo_config_is_a_valid_override_set() -> None:
    from brightrun._protocol import training_overrides

    assert training_overrides(DEMO_CONFIG).overrides()


def test_demo_server_starts_and_stops(tmp_path: Path) -> None:
    server = DemoServer(tmp_path)
    server.start()
    try:
        target = server.wait_ready(timeout=60)
        with brightrun.Client(target, api_key=server.admin_key()) as c:  # the key the fresh server wrote
            c.wait_until_ready(timeout=10)
            assert c.jobs.list().first() is None
    finally:
        server.stop()
    assert server.process is not None
    assert server.process.returncode is not None
    assert server.log_path.exists()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    """The README's demo command, not on a terminal: plain progress lines, a
    summary with the adapter path and how to load it, exit 0, no server left."""
    env = {**os.environ, "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-m", "brightrun.cli", "demo", "--data-dir", str(tmp_path / "demo"), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "training: " in out
    assert "completed in" in out
    assert "adapter: " in out
    assert "PeftModel.from_pretrained(base, " in out
    adapter = next(line.split("adapter: ", 1)[1].strip() for line in out.splitlines() if "adapter: " in line)
    assert (Path(adapter) / "adapter_config.json").is_file()
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == ""
