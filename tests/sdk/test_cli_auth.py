"""``brightrun keys`` and ``brightrun whoami`` against a real server, and how
the CLI reports a refused key: one line on stderr saying what to do, no traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdk_harness import RestartableServer
from typer.testing import CliRunner

import brightrun
from brightrun.cli import app
from tests.conftest import TEST_API_KEY

runner = CliRunner()

#: Well-formed (brk_<12>_<40>) but known to no server.
UNKNOWN_KEY = "brk_unknown00000_" + "x" * 40


def cli(address: str, *args: str, env: dict[str, str | None] | None = None) -> Any:
    return runner.invoke(app, ["--target", address, *args], env=env)


def test_cli_key_lifecycle(idle_server: RestartableServer) -> None:
    address = idle_server.address
    quiet = cli(address, "keys", "create", "ci", "--role", "member", "--ttl", "30d", "-q")
    assert quiet.exit_code == 0, quiet.output
    secret = quiet.stdout.strip()
    assert quiet.stdout == secret + "\n"
    assert secret.startswith("brk_")
    assert "shown only this once" in quiet.stderr

    loud = cli(address, "keys", "create", "ana", "--role", "viewer")
    assert loud.exit_code == 0, loud.output
    assert "secret" in loud.stdout
    assert "viewer" in loud.stdout
    assert "never" in loud.stdout
    as_json = json.loads(cli(address, "keys", "create", "bot", "--json").stdout)
    assert as_json["secret"].startswith(f"brk_{as_json['api_key']['id']}_")
    assert as_json["api_key"]["role"] == "member"

    listed = cli(address, "keys", "list", "--json")
    assert listed.exit_code == 0, listed.output
    keys = {k["name"]: k for k in json.loads(listed.stdout)}
    assert {"ci", "ana", "bot"} <= set(keys)
    assert secret not in listed.stdout
    assert "secret" not in keys["ci"]
    table = cli(address, "keys", "list")
    assert table.exit_code == 0
    assert "ci" in table.stdout
    assert "active" in table.stdout

    me = cli(address, "--api-key", secret, "whoami")
    assert me.exit_code == 0, me.output
    assert "member" in me.stdout
    assert "ci" in me.stdout
    assert "default" in me.stdout

    key_id = keys["ci"]["id"]
    revoked = cli(address, "keys", "revoke", key_id)
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked API key {key_id}" in revoked.stdout
    assert key_id not in cli(address, "keys", "list").stdout
    assert key_id in cli(address, "keys", "list", "--all").stdout

    refused = cli(address, "--api-key", secret, "whoami")
    assert refused.exit_code == 1
    assert "API key refused" in refused.stderr
    assert "API_KEY_REVOKED" in refused.stderr
    assert "Traceback" not in refused.output
    for k in ("ana", "bot"):
        assert cli(address, "keys", "revoke", keys[k]["id"], "--json").exit_code == 0


def test_cli_auth_failures_are_one_helpful_line(idle_server: RestartableServer) -> None:
    address = idle_server.address
    no_key = {"BRIGHTRUN_API_KEY": None, "BRIGHTRUN_API_KEY_FILE": None}
    missing = cli(address, "jobs", "list", env=no_key)
    assert missing.exit_code == 1
    assert "API_KEY_MISSING" in missing.stderr
    assert "--api-key" in missing.stderr
    assert "admin-api-key" in missing.stderr
    assert "Traceback" not in missing.output

    waited = cli(address, "--api-key", UNKNOWN_KEY, "jobs", "wait", "job_x")
    assert waited.exit_code == 6  # jobs wait: could not follow the job
    assert "API_KEY_INVALID" in waited.stderr

    with brightrun.Client(address) as admin:
        viewer = admin.api_keys.create("cli-viewer", role="viewer")
    denied = cli(address, "--api-key", viewer.secret, "keys", "create", "x")
    assert denied.exit_code == 1
    assert "needs the admin role" in denied.stderr
    assert "Traceback" not in denied.output
    with brightrun.Client(address) as admin:
        admin.api_keys.revoke(viewer)

    assert cli(address, "keys", "create", "x", "--role", "owner").exit_code == 2
    assert cli(address, "keys", "create", "x", "--ttl", "soon").exit_code == 2


def test_cli_reads_the_key_file(idle_server: RestartableServer, tmp_path: Path) -> None:
    key_file = tmp_path / "admin-api-key"
    key_file.write_text(TEST_API_KEY + "\n")
    env: dict[str, str | None] = {"BRIGHTRUN_API_KEY": None, "BRIGHTRUN_API_KEY_FILE": str(key_file)}
    me = cli(idle_server.address, "whoami", "--json", env=env)
    assert me.exit_code == 0, me.output
    assert json.loads(me.stdout)["role"] == "admin"

    env["BRIGHTRUN_API_KEY_FILE"] = str(tmp_path / "nope")
    missing = cli(idle_server.address, "whoami", env=env)
    assert missing.exit_code == 1
    assert "cannot read the API key file" in missing.stderr
    assert "Traceback" not in missing.output
