"""Authentication and roles: every RPC needs a key except health, each key
acts with its role, keys are hashed at rest, revocable, expiring and rate
limited. Tables are checked against the methods the live server serves."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from brightrun.v1 import api_key_service_pb2 as ak
from brightrun.v1 import api_key_service_pb2_grpc, job_service_pb2_grpc
from brightrun.v1 import job_service_pb2 as js
from brightrun.v1 import trainer_service_pb2 as ts
from brightrun_server.domain import auth
from tests.conftest import TEST_API_KEY, ServerHandle, auth_channel, start_server, stop_server
from tests.server.conftest import Stubs, details, stubs_for
from tests.server.rpcs import Rpc, call, served_methods

ROLE = {"viewer": ak.ROLE_VIEWER, "member": ak.ROLE_MEMBER, "admin": ak.ROLE_ADMIN}


@pytest.fixture
def methods(stubs: Stubs) -> dict[str, Rpc]:
    return served_methods(stubs.channel)


def test_every_served_method_has_exactly_one_access_rule(methods: dict[str, Rpc]) -> None:
    """A new RPC without a decision about who may call it fails here."""
    rules = [auth.PUBLIC, auth.ATTEMPT_TOKEN, set(auth.METHOD_ROLES)]
    for path in methods:
        assert sum(path in r for r in rules) == 1, f"{path} needs exactly one entry in domain/auth.py"
    stale = (auth.PUBLIC | auth.ATTEMPT_TOKEN | set(auth.METHOD_ROLES)) - set(methods)
    assert not stale, f"rules for methods the server does not serve: {sorted(stale)}"


def test_every_method_but_health_refuses_a_call_without_a_key(server: ServerHandle, methods: dict[str, Rpc]) -> None:
    bare = auth_channel(server.address, api_key=None)
    try:
        for path, rpc in methods.items():
            if path in auth.PUBLIC or path in auth.ATTEMPT_TOKEN:
                continue
            with pytest.raises(grpc.RpcError) as caught:
                call(bare, rpc, rpc.request_class(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
            info, _ = details(caught.value)
            assert info.reason == "API_KEY_MISSING", path
            assert "authorization: Bearer" in (caught.value.details() or "")
        health = health_pb2_grpc.HealthStub(bare)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        bare.close()


def test_trainer_reports_need_the_attempt_token_not_an_api_key(server: ServerHandle, methods: dict[str, Rpc]) -> None:
    rpc = methods["/brightrun.v1.TrainerService/ReportAttempt"]
    # Even an admin key does not let a caller report for an attempt.
    with pytest.raises(grpc.RpcError) as caught:
        call(server.channel(), rpc, ts.ReportAttemptRequest(attempt_id="att_0000000000000000000000000"))
    assert caught.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("Bearer brk_nope", "API_KEY_INVALID"),
        ("Bearer " + TEST_API_KEY[:-1] + "X", "API_KEY_INVALID"),  # right id, wrong secret
        ("Bearer brk_aaaaaaaaaaaa_" + "a" * 40, "API_KEY_INVALID"),  # well formed, unknown
        ("Basic " + TEST_API_KEY, "API_KEY_MISSING"),
    ],
)
def test_bad_credentials_are_named(stubs: Stubs, value: str, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.ListJobs(js.ListJobsRequest(), metadata=(("authorization", value),))
    # The channel adds the test key after this one; the first authorization header counts.
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(caught.value)[0].reason == reason


def test_key_lifecycle_create_use_list_revoke(server: ServerHandle, stubs: Stubs) -> None:
    assert stubs.keys is not None
    created = stubs.keys.CreateApiKey(ak.CreateApiKeyRequest(name="ci", role=ak.ROLE_MEMBER))
    secret = created.secret
    assert secret.startswith(f"brk_{created.api_key.id}_")
    assert created.api_key.project == "default"
    assert created.api_key.created_by == "bootstrap"

    ci = stubs_for(server, secret)
    assert ci.keys is not None
    who = ci.keys.GetCaller(ak.GetCallerRequest())
    assert (who.project, who.role, who.api_key.id, who.api_key.name) == (
        "default",
        ak.ROLE_MEMBER,
        created.api_key.id,
        "ci",
    )
    dataset = ci.upload_example()
    job = ci.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="/nonexistent/model"))
    assert job.created_by == "ci"

    listed = stubs.keys.ListApiKeys(ak.ListApiKeysRequest())
    assert {k.id for k in listed.api_keys} >= {created.api_key.id}
    assert secret not in str(listed)

    # Hashed at rest: the secret appears nowhere in the database.
    engine = sa.create_engine(server.database_url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text("SELECT * FROM api_keys")).mappings()]
    engine.dispose()
    assert rows
    assert secret not in json.dumps(rows, default=str)
    assert secret.split("_")[-1] not in json.dumps(rows, default=str)

    revoked = stubs.keys.RevokeApiKey(ak.RevokeApiKeyRequest(api_key_id=created.api_key.id))
    assert revoked.revoke_time.seconds > 0
    with pytest.raises(grpc.RpcError) as caught:
        ci.jobs.GetJob(js.GetJobRequest(job_id=job.id))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info, _ = details(caught.value)
    assert info.reason == "API_KEY_REVOKED"
    assert info.metadata["api_key_id"] == created.api_key.id
    assert created.api_key.id not in {k.id for k in stubs.keys.ListApiKeys(ak.ListApiKeysRequest()).api_keys}
    shown = stubs.keys.ListApiKeys(ak.ListApiKeysRequest(show_revoked=True))
    assert created.api_key.id in {k.id for k in shown.api_keys}
    # Revoking again is a no-op that returns the key.
    again = stubs.keys.RevokeApiKey(ak.RevokeApiKeyRequest(api_key_id=created.api_key.id))
    assert again.revoke_time == revoked.revoke_time
    ci.channel.close()


def test_keys_expire(server: ServerHandle, stubs: Stubs) -> None:
    assert stubs.keys is not None
    created = stubs.keys.CreateApiKey(
        ak.CreateApiKeyRequest(name="short", role=ak.ROLE_VIEWER, ttl=duration_pb2.Duration(seconds=1))
    )
    short = stubs_for(server, created.secret)
    short.jobs.ListJobs(js.ListJobsRequest())
    time.sleep(1.2)
    with pytest.raises(grpc.RpcError) as caught:
        short.jobs.ListJobs(js.ListJobsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(caught.value)[0].reason == "API_KEY_EXPIRED"
    short.channel.close()


def test_create_key_validates_its_fields(stubs: Stubs) -> None:
    assert stubs.keys is not None
    with pytest.raises(grpc.RpcError) as caught:
        stubs.keys.CreateApiKey(
            ak.CreateApiKeyRequest(name="", role=7, ttl=duration_pb2.Duration(seconds=-5))  # type: ignore[arg-type]
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details(caught.value)[1]] == ["role"]
    with pytest.raises(grpc.RpcError) as caught:
        stubs.keys.CreateApiKey(ak.CreateApiKeyRequest(name="", ttl=duration_pb2.Duration(seconds=-5)))
    assert sorted(f for f, _ in details(caught.value)[1]) == ["name", "ttl"]
    with pytest.raises(grpc.RpcError) as caught:
        stubs.keys.RevokeApiKey(ak.RevokeApiKeyRequest(api_key_id="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(caught.value)[0].reason == "API_KEY_NOT_FOUND"


@pytest.fixture
def role_channels(server: ServerHandle, stubs: Stubs) -> Iterator[dict[str, grpc.Channel]]:
    channels = {name: server.channel(stubs.new_key(f"{name}-key", role)) for name, role in ROLE.items()}
    yield channels
    for channel in channels.values():
        channel.close()


def test_roles_table_driven(methods: dict[str, Rpc], role_channels: dict[str, grpc.Channel]) -> None:
    """Each key may call exactly the methods its role allows: the refusal comes
    before the request is even read, so an empty request tells them apart."""
    checked = 0
    for path, required in auth.METHOD_ROLES.items():
        rpc = methods[path]
        for name, channel in role_channels.items():
            allowed = auth.RANK[auth.Role(name)] >= auth.RANK[required]
            try:
                call(channel, rpc, rpc.request_class(), timeout=3, max_items=1)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            if allowed:
                assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), (path, name)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (path, name, code)
            checked += 1
    assert checked == 3 * len(auth.METHOD_ROLES)


def test_permission_denied_names_the_role_needed(role_channels: dict[str, grpc.Channel]) -> None:
    jobs = job_service_pb2_grpc.JobServiceStub(role_channels["viewer"])
    with pytest.raises(grpc.RpcError) as caught:
        jobs.CancelJob(js.CancelJobRequest(job_id="job_x"))
    info, _ = details(caught.value)
    assert info.reason == "ROLE_REQUIRED"
    assert (info.metadata["required_role"], info.metadata["role"]) == ("member", "viewer")
    assert info.metadata["method"] == "/brightrun.v1.JobService/CancelJob"
    keys = api_key_service_pb2_grpc.ApiKeyServiceStub(role_channels["member"])
    with pytest.raises(grpc.RpcError) as caught:
        keys.CreateApiKey(ak.CreateApiKeyRequest(name="escalate", role=ak.ROLE_ADMIN))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_rate_limit_per_key_with_retry_info(tmp_path: Path) -> None:
    handle = start_server(tmp_path, rate_limit_per_second=5, rate_limit_burst=5)
    try:
        admin = stubs_for(handle)
        other = stubs_for(handle, admin.new_key("other", ak.ROLE_VIEWER))
        limited: grpc.RpcError | None = None
        for _ in range(20):
            try:
                admin.jobs.ListJobs(js.ListJobsRequest())
            except grpc.RpcError as e:
                limited = e
                break
        assert limited is not None, "20 calls in a burst of 5 were all allowed"
        assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(limited)[0].reason == "RATE_LIMITED"
        status = rpc_status.from_call(limited)  # type: ignore[arg-type]
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR))
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        assert 0 < delay <= 0.25
        # Another key has its own budget; waiting the delay is enough for this one.
        other.jobs.ListJobs(js.ListJobsRequest())
        time.sleep(delay + 0.01)
        admin.jobs.ListJobs(js.ListJobsRequest())
        admin.channel.close()
        other.channel.close()
    finally:
        stop_server(handle)


def test_a_store_without_keys_gets_an_admin_key_file(tmp_path: Path) -> None:
    handle = start_server(tmp_path, bootstrap_api_key=None)
    try:
        path = handle.data_dir / "admin-api-key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        secret = path.read_text().strip()
        keys = api_key_service_pb2_grpc.ApiKeyServiceStub(handle.channel(secret))
        who = keys.GetCaller(ak.GetCallerRequest())
        assert (who.project, who.role) == ("default", ak.ROLE_ADMIN)
    finally:
        stop_server(handle)
    # A restart does not make another one.
    path.unlink()
    handle = start_server(tmp_path, bootstrap_api_key=None)
    try:
        assert not path.exists()
    finally:
        stop_server(handle)


def _buf() -> list[str] | None:
    npx = shutil.which("npx")
    return [npx, "-y", "@bufbuild/buf"] if npx else None


def test_buf_curl_a_third_party_client_authenticates_by_header(server: ServerHandle) -> None:
    buf = _buf()
    if buf is None:
        pytest.skip("npx (for @bufbuild/buf) is not installed")
    base = [*buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect"]
    url = f"http://{server.address}/brightrun.v1.ApiKeyService/GetCaller"
    env = {**os.environ, "NO_COLOR": "1"}
    ok = subprocess.run(
        [*base, "-H", f"authorization: Bearer {TEST_API_KEY}",
         "--reflect-header", f"authorization: Bearer {TEST_API_KEY}", "-d", "{}", url],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["role"] == "ROLE_ADMIN"
    refused = subprocess.run(
        [*base, "--reflect-header", f"authorization: Bearer {TEST_API_KEY}", "-d", "{}", url],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "unauthenticated" in refused.stderr.lower()


def test_health_watch_streams_and_list_is_unimplemented_without_a_key(server: ServerHandle) -> None:
    """Health is public, including grpcio's Watch (a coroutine writing with
    context.write(), not an async generator) and List (not implemented)."""
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as listed:
            health.List(health_pb2.HealthListRequest(), timeout=10)
        assert listed.value.code() == grpc.StatusCode.UNIMPLEMENTED
