"""API keys through the SDK, against real servers: the key lifecycle, roles,
revocation, where the client finds its key, and retries after the server's
rate limit. The CLI's ``keys`` and ``whoami``: test_cli_auth.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sdk_harness import RestartableServer

import brightrun
from brightrun import Role

#: Well-formed (brk_<12>_<40>) but known to no server.
UNKNOWN_KEY = "brk_unknown00000_" + "x" * 40


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[RestartableServer]:
    """A server on an empty store and no bootstrap key: it makes its own admin
    key and writes it to <data dir>/admin-api-key."""
    server = RestartableServer(tmp_path / "data", bootstrap_api_key=None).start()
    yield server
    server.stop(kill_workers=True)


# ---------------------------------------------------------------- SDK


def test_key_lifecycle(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    created = client.api_keys.create("ana-laptop", role="member", ttl=timedelta(days=30))
    key = created.api_key
    assert isinstance(created, brightrun.CreatedApiKey)
    assert created.secret.startswith(f"brk_{key.id}_")
    assert created.id == key.id
    assert created.secret not in repr(created)
    assert created.secret not in str(created)
    assert key.name == "ana-laptop"
    assert key.role is Role.MEMBER
    assert key.project == "default"
    assert key.created_by == "bootstrap"  # the name of the key that created it
    assert key.expire_time is not None
    assert timedelta(days=29) < key.expire_time - datetime.now(UTC) <= timedelta(days=30)
    assert key.is_active
    assert key.revoke_time is None

    listed = {k.id: k for k in client.api_keys.list()}
    assert listed[key.id].name == "ana-laptop"
    assert all(not hasattr(k, "secret") for k in listed.values())

    with brightrun.Client(client.target, api_key=created.secret) as ana:
        me = ana.whoami()
        assert (me.project, me.role, me.api_key.id, me.api_key.name) == ("default", Role.MEMBER, key.id, "ana-laptop")
        job = ana.jobs.create(dataset=idle_dataset, base_model="some/model", force=True)
        assert job.created_by == "ana-laptop"  # the key's name is the actor

        revoked = client.api_keys.revoke(created)
        assert revoked.id == key.id
        assert revoked.is_revoked
        assert not revoked.is_active
        assert client.api_keys.revoke(key.id).revoke_time == revoked.revoke_time  # unchanged, not an error

        with pytest.raises(brightrun.AuthenticationError) as info:
            ana.jobs.get(job.id)
    e = info.value
    assert (e.problem, e.reason) == ("revoked", "API_KEY_REVOKED")
    assert isinstance(e, brightrun.UnauthenticatedError)  # the older name catches it too
    assert "brightrun keys create" in str(e)
    assert key.id not in {k.id for k in client.api_keys.list()}
    assert client.api_keys.list(show_revoked=True, page_size=1).first() is not None
    assert key.id in {k.id for k in client.api_keys.list(show_revoked=True, page_size=2)}  # across pages


def test_revoke_takes_a_leaked_secret_and_sends_only_its_id(client: brightrun.Client) -> None:
    created = client.api_keys.create("leaked")
    assert client.api_keys.revoke(created.secret).id == created.id


def test_a_viewer_reads_but_may_not_manage_keys(client: brightrun.Client) -> None:
    viewer = client.api_keys.create("dashboards", role=Role.VIEWER)
    member = client.api_keys.create("trainer-bot", role="member")
    with brightrun.Client(client.target, api_key=viewer.secret) as c:
        assert c.whoami().role is Role.VIEWER
        c.jobs.list(limit=1).to_list()
        with pytest.raises(brightrun.PermissionDeniedError) as info:
            c.api_keys.create("sneaky", role="admin")
    e = info.value
    assert e.reason == "ROLE_REQUIRED"
    assert (e.required_role, e.role) == (Role.ADMIN, Role.VIEWER)
    assert e.method == "/brightrun.v1.ApiKeyService/CreateApiKey"
    assert "needs the admin role" in str(e)
    assert "key with the admin role" in str(e)
    with brightrun.Client(client.target, api_key=member.secret) as c, pytest.raises(brightrun.PermissionDeniedError):
        c.api_keys.list().first()
    for k in (viewer, member):
        client.api_keys.revoke(k)


def test_missing_and_unknown_keys_say_what_to_do(idle_server: RestartableServer) -> None:
    with brightrun.Client(idle_server.address, api_key="") as c, pytest.raises(brightrun.AuthenticationError) as info:
        c.whoami()
    assert info.value.problem == "missing"
    assert "BRIGHTRUN_API_KEY" in str(info.value)
    assert "admin-api-key" in str(info.value)

    with (
        brightrun.Client(idle_server.address, api_key=UNKNOWN_KEY) as c,
        pytest.raises(brightrun.AuthenticationError) as info,
    ):
        c.datasets.list().first()
    assert (info.value.problem, info.value.reason) == ("invalid", "API_KEY_INVALID")


def test_create_checks_its_arguments(client: brightrun.Client) -> None:
    with pytest.raises(ValueError, match="viewer, member, admin"):
        client.api_keys.create("x", role="owner")
    with pytest.raises(ValueError, match="ttl"):
        client.api_keys.create("x", ttl=-1)
    with pytest.raises(brightrun.InvalidArgumentError) as info:
        client.api_keys.create("n" * 65)
    assert [v.field for v in info.value.field_violations] == ["name"]


async def test_async_key_lifecycle(aclient: brightrun.AsyncClient) -> None:
    created = await aclient.api_keys.create("async-ci", role="viewer", ttl=3600)
    assert created.api_key.role is Role.VIEWER
    assert created.api_key.id in [k.id async for k in aclient.api_keys.list()]
    async with brightrun.AsyncClient(aclient.target, api_key=created.secret) as c:
        assert (await c.whoami()).api_key.name == "async-ci"
        await aclient.api_keys.revoke(created.api_key)
        with pytest.raises(brightrun.AuthenticationError) as info:
            await c.whoami()
    assert info.value.problem == "revoked"
    assert (await aclient.whoami()).role is Role.ADMIN


# ---------------------------------------------------------------- where the key comes from


def test_key_file_of_a_fresh_server(fresh_server: RestartableServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """BRIGHTRUN_API_KEY_FILE reads the key a fresh server wrote for its admin;
    precedence: api_key= > BRIGHTRUN_API_KEY > BRIGHTRUN_API_KEY_FILE."""
    key_file = fresh_server.data_dir / "admin-api-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    monkeypatch.delenv("BRIGHTRUN_API_KEY")
    monkeypatch.setenv("BRIGHTRUN_API_KEY_FILE", str(key_file))
    with brightrun.Client(fresh_server.address) as c:
        me = c.whoami()
    assert (me.role, me.api_key.name, me.api_key.created_by) == (Role.ADMIN, "admin", "server")

    monkeypatch.setenv("BRIGHTRUN_API_KEY", UNKNOWN_KEY)  # the env var wins over the file
    with brightrun.Client(fresh_server.address) as c, pytest.raises(brightrun.AuthenticationError):
        c.whoami()
    with brightrun.Client(fresh_server.address, api_key=key_file.read_text().strip()) as c:
        assert c.whoami().role is Role.ADMIN  # and an explicit key over both

    monkeypatch.delenv("BRIGHTRUN_API_KEY")
    monkeypatch.setenv("BRIGHTRUN_API_KEY_FILE", str(key_file.with_name("nope")))
    with pytest.raises(brightrun.ConfigurationError, match="BRIGHTRUN_API_KEY_FILE"):
        brightrun.Client(fresh_server.address)
    empty = key_file.with_name("empty")
    empty.write_text("\n")
    monkeypatch.setenv("BRIGHTRUN_API_KEY_FILE", str(empty))
    with pytest.raises(brightrun.ConfigurationError, match="is empty"):
        brightrun.Client(fresh_server.address)


# ---------------------------------------------------------------- rate limits


def _first_refusal(client: brightrun.Client) -> brightrun.ResourceExhaustedError:
    for _ in range(20):
        try:
            client.whoami()
        except brightrun.ResourceExhaustedError as e:
            return e
    pytest.fail("20 calls in a row at 5 a second were never rate limited")


def test_rate_limited_calls_wait_the_servers_delay(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Over the key's rate limit the server answers RESOURCE_EXHAUSTED with
    RetryInfo; the client waits that delay (not its own 5 s backoff) and
    retries reads, and writes too: a rate-limited call never ran."""
    server = RestartableServer(tmp_path / "data", rate_limit_per_second=5, rate_limit_burst=5).start()
    try:
        with brightrun.Client(server.address, retry=None) as impatient:
            e = _first_refusal(impatient)
        assert e.reason == "RATE_LIMITED"
        assert e.retry_delay is not None
        assert timedelta(0) < e.retry_delay <= timedelta(seconds=0.25)

        slow_backoff = brightrun.RetryPolicy(max_attempts=6, initial=5.0, maximum=5.0, jitter=False)
        with brightrun.Client(server.address, retry=slow_backoff) as c, caplog.at_level(logging.INFO, "brightrun"):
            start = time.monotonic()
            for _ in range(8):
                c.whoami()  # a read
            created = c.api_keys.create("rate-limited-write")  # a plain write, refused before it ran
            elapsed = time.monotonic() - start
        retries = [r for r in caplog.records if "RATE_LIMITED" in r.getMessage()]
        assert retries, "the calls were never rate limited"
        assert elapsed < 4.5, f"waited {elapsed:.1f}s: the policy's backoff, not the server's delay"
        assert elapsed >= 1.0  # 9 calls at 5 a second from an empty bucket
        assert created.api_key.name == "rate-limited-write"
    finally:
        server.stop(kill_workers=True)
