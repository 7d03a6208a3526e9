"""Hypothesis fuzzing of every RPC the server serves, against a live server.

For each served method, requests are generated from the protobuf descriptors
(tests/fuzz/strategies.py) and aimed partly at real resources of a seeded
world (tests/fuzz/conftest.py). Properties, for every example:

* no INTERNAL or UNKNOWN status;
* the server keeps serving (a health check after each example);
* INVALID_ARGUMENT carries a BadRequest whose every field violation names a
  real field path of the request;
* every other BrightRun error carries an ErrorInfo in domain brightrun.dev
  with a reason from ErrorReason (proto/brightrun/v1/errors.proto).

Reproducible: derandomized. BRIGHTRUN_FUZZ_EXAMPLES scales the examples per
RPC; the falsifying request is printed in text format on failure.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import brightrun.v1
from brightrun.v1 import dataset_service_pb2 as ds
from brightrun.v1 import errors_pb2
from brightrun_server.domain.listing import encode_page_token
from brightrun_trainer.spec import ATTEMPT_TOKEN_METADATA
from tests.conftest import EXAMPLES, postgres_schema
from tests.fuzz import strategies
from tests.fuzz.conftest import World, build_world
from tests.server.conftest import details
from tests.server.rpcs import Rpc, _load_descriptors, call, served_methods

pytestmark = pytest.mark.slow

EXAMPLES_PER_RPC = int(os.environ.get("BRIGHTRUN_FUZZ_EXAMPLES", "60"))

#: Methods served but not fuzzed, each with its reason. Keep it short.
EXEMPT: dict[str, str] = {}

#: Fuzzed methods that fail today, each with its reason; strict, so a fix
#: turns the mark into a failure that asks for its removal.
KNOWN_BROKEN: dict[str, str] = {}

#: Services whose errors are grpcio's own (no BrightRun ErrorInfo): only the
#: status-code and keeps-serving properties apply.
LIBRARY_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

REASONS = {v.name.removeprefix("ERROR_REASON_") for v in errors_pb2.DESCRIPTOR.enum_types_by_name["ErrorReason"].values}
REASONS.discard("UNSPECIFIED")

#: A server-streaming call that has nothing (more) to send waits for news; it
#: ends at this client deadline, which is no failure.
STREAM_TIMEOUT = 0.3
UNARY_TIMEOUT = 30.0
#: Below the server's 4 MiB receive limit, which answers in grpcio's own words.
MAX_REQUEST_BYTES = 3 * 1024 * 1024


def _all_methods() -> list[str]:
    """Every method the server is expected to serve, from the generated descriptors."""
    _load_descriptors()
    names = ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    for info in pkgutil.iter_modules(brightrun.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"brightrun.v1.{info.name}")
            names.extend(s.full_name for s in module.DESCRIPTOR.services_by_name.values())
    pool = descriptor_pool.Default()
    return sorted(f"/{name}/{m.name}" for name in names for m in pool.FindServiceByName(name).methods)


FUZZED = _all_methods()


# ---------------------------------------------------------------- hints


def _pick(pool: list[str]) -> st.SearchStrategy[str]:
    """A member of `pool` as it is when drawn (the world changes as we go)."""
    return st.integers(0, 2**20).map(lambda i: pool[i % len(pool)] if pool else "")


FILTER_FIELDS = [
    "state", "format", "name", "labels.team", "labels.", "labels.a.b", "create_time", "base_model", "preset",
    "pricing_tier", "dataset_id", "spend_usd", "gpu_type", "created_by", "bogus", "AND", "labels.\u00e9",
]  # fmt: skip
FILTER_OPS = ["=", "!=", "<", "<=", ">", ">=", ":", "==", ""]
FILTER_VALUES = [
    "QUEUED", "training", "ready", "JSONL", "SPOT", "quick", '"a b"', '""', '"\\u0000"', '"a\\u0000b"',
    "2024-01-01T00:00:00Z", "2024-01-01T00:00:00+23:59", "0001-01-01", "9999-12-31T23:59:59-23:59", "1e400",
    "-1e309", "nan", "inf", "99999999999999999999999", "-", '"\\ud800"', "A100-80GB",
]  # fmt: skip


def filters() -> st.SearchStrategy[str]:
    value = st.one_of(st.sampled_from(FILTER_VALUES), strategies.text().map(json.dumps))
    term = st.builds(lambda f, o, v: f"{f} {o} {v}", st.sampled_from(FILTER_FIELDS), st.sampled_from(FILTER_OPS), value)
    joiner = st.sampled_from([" AND ", " and ", " OR ", " ", "AND"])
    return st.one_of(
        term,
        st.builds(lambda a, j, b: a + j + b, term, joiner, term),
        strategies.text(),
    )


def page_tokens(world: World) -> st.SearchStrategy[str]:
    """Real tokens, garbage, and tokens forged for the right query holding keys
    of the wrong shape (the token is opaque, not signed)."""
    scopes = st.one_of(
        st.sampled_from(
            ["jobs|default|||create_time|True", "datasets|default|", "audit|default", "api_keys|default|False"]
        ),
        _pick(world.jobs).map(lambda j: f"metrics|{j}"),
        _pick(world.jobs).map(lambda j: f"events|{j}||"),
    )
    scalar = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        strategies.floats(64),
        st.sampled_from(["2024-01-01T00:00:00+00:00", "not a time", "", "job_x", "9999-12-31T23:59:59"]),
    )
    keys = st.one_of(st.lists(scalar, max_size=4), scalar, st.dictionaries(st.text(max_size=3), scalar, max_size=2))
    forged = st.builds(encode_page_token, keys.map(lambda k: k if isinstance(k, list) else [k]), scopes)
    raw = st.builds(
        lambda body: base64.urlsafe_b64encode(body.encode()).decode(),
        st.sampled_from(['{"k":1,"q":"x"}', "[]", "null", '{"k":[]}', "{}", "\x00"]),
    )
    return st.one_of(_pick(world.page_tokens), forged, raw, strategies.text())


def hints(world: World) -> dict[str, st.SearchStrategy[Any]]:
    jobs = _pick(world.jobs)
    return {
        "dataset_id": _pick(world.datasets),
        "job_id": jobs,
        "job_ids": jobs,
        "checkpoint_id": _pick(world.checkpoints),
        "api_key_id": _pick(world.key_ids),
        "attempt_id": _pick(world.attempt_ids),
        "fix_ids": _pick(world.fix_ids),
        "request_id": st.sampled_from(["fuzz-r1", "fuzz-r2", "r" * 129, "a b", "\x00"]),
        "base_model": st.sampled_from(
            ["scripted/model", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.1-8B", "/nonexistent"]
        ),
        "gpu_type": st.sampled_from(["A100-80GB", "a100-80gb", "H100-80GB", "T4", "cpu", ""]),
        "filter": filters(),
        "order_by": st.sampled_from(["create_time desc", "name", "state asc", "bogus", "name sideways", "a b c"]),
        "page_token": page_tokens(world),
        "filename": st.sampled_from(["data.jsonl", "chat.json", "x.csv", "../x.jsonl", ".jsonl", "a\x00.jsonl"]),
        "sha256": st.one_of(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), st.just("0" * 63)),
        "labels.key": st.sampled_from(["team", "a", "Team", "a" * 63, "a" * 64, "1abc", "x-y_z", "é"]),
        "path": st.sampled_from(["checkpoints/step-2", "../../..", "/etc", "staging/adapter", ""]),
        "adapter_path": st.sampled_from(["staging/adapter", "../../..", "/", ""]),
    }


# ---------------------------------------------------------------- requests per RPC


def requests_for(rpc: Rpc, world: World) -> st.SearchStrategy[tuple[Any, tuple[tuple[str, str], ...]]]:
    """(request or list of stream messages, call metadata)."""
    hinted = hints(world)
    base = strategies.messages(rpc.request_class.DESCRIPTOR, hinted)
    if rpc.name == "UploadDataset":
        return st.tuples(uploads(hinted), st.just(()))
    if rpc.name == "ReportAttempt":
        return report_calls(world, base)
    if rpc.name == "ServerReflectionInfo":
        return st.tuples(st.lists(base, min_size=1, max_size=3), st.just(()))
    return st.tuples(base, st.just(()))


def uploads(hinted: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[list[Any]]:
    """Metadata then chunks (random bytes or a real dataset, split anywhere),
    and sometimes a stream in the wrong shape."""
    meta = strategies.messages(ds.UploadDatasetMetadata.DESCRIPTOR, hinted)
    real = (EXAMPLES / "support_chat.jsonl").read_bytes()
    content = st.one_of(st.binary(max_size=2048), st.just(real), st.just(real[: len(real) // 2]))

    @st.composite
    def well_formed(draw: st.DrawFn) -> list[Any]:
        data = draw(content)
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        return [ds.UploadDatasetRequest(metadata=draw(meta))] + [ds.UploadDatasetRequest(chunk=p) for p in pieces]

    any_message = strategies.messages(ds.UploadDatasetRequest.DESCRIPTOR, hinted)
    return st.one_of(well_formed(), well_formed(), st.lists(any_message, max_size=4))


def report_calls(world: World, base: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """ReportAttempt with and without the running attempt's real token and id;
    sometimes the reports are numbered on from what the server acknowledged,
    so they get past REPORT_OUT_OF_ORDER."""

    @st.composite
    def draw_call(draw: st.DrawFn) -> tuple[Any, tuple[tuple[str, str], ...]]:
        request = draw(base)
        attempt = world.attempt
        assert attempt is not None
        if draw(st.booleans()):
            request.attempt_id = attempt.attempt_id
        if draw(st.booleans()):
            for i, report in enumerate(request.reports):
                report.sequence = attempt.seq + 1 + i
        token = draw(st.sampled_from(["real", "real", "none", "wrong", "empty"]))
        metadata: tuple[tuple[str, str], ...] = {
            "real": ((ATTEMPT_TOKEN_METADATA, attempt.token),),
            "none": (),
            "wrong": ((ATTEMPT_TOKEN_METADATA, "t" * 43),),
            "empty": ((ATTEMPT_TOKEN_METADATA, ""),),
        }[token]
        return request, metadata

    return draw_call()


# ---------------------------------------------------------------- the properties


def _show(request: Any) -> str:
    messages = request if isinstance(request, list) else [request]
    return "\n---\n".join(text_format.MessageToString(m, as_utf8=True)[:4000] for m in messages)


def check(world: World, channel: grpc.Channel, rpc: Rpc, request: Any, metadata: Any) -> None:
    stream = rpc.server_streaming
    try:
        response = call(
            channel, rpc, request, metadata=metadata, timeout=STREAM_TIMEOUT if stream else UNARY_TIMEOUT, max_items=2
        )
    except grpc.RpcError as error:
        code = error.code()
        shown = f"{rpc.path} -> {code.name}: {error.details()}\nrequest:\n{_show(request)}"
        if stream and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), shown
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, shown
        if rpc.path.startswith(LIBRARY_SERVICES):
            return
        info, violations = details(error)
        assert info.reason in REASONS, f"reason {info.reason!r} not in ErrorReason; {shown}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert violations, f"INVALID_ARGUMENT without field violations; {shown}"
            descriptor = rpc.request_class.DESCRIPTOR
            for field, _ in violations:
                assert strategies.names_field(descriptor, field), (
                    f"violation names no request field: {field!r}; {shown}"
                )
    else:
        if rpc.name == "ReportAttempt" and world.attempt is not None and request.attempt_id == world.attempt.attempt_id:
            world.attempt.seq = max(world.attempt.seq, response.acknowledged_sequence)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING, f"server stopped serving after {rpc.path}"


def fuzz(world: World, path: str, examples: int) -> None:
    channel = world.stubs.channel
    rpc = world.rpcs[path]
    world.refresh()
    strategy = requests_for(rpc, world)
    refresh_each = rpc.name in ("ReportAttempt", "CancelJob", "BulkCancelJobs", "PauseJob", "DeleteDataset")

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        if refresh_each:
            world.refresh()
        request, metadata = data.draw(strategy, label="request")
        messages = request if isinstance(request, list) else [request]
        assume(sum(m.ByteSize() for m in messages) < MAX_REQUEST_BYTES)
        check(world, channel, rpc, request, metadata)

    run()


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def served(world: World) -> dict[str, Rpc]:
    world.rpcs = served_methods(world.stubs.channel)
    return world.rpcs


def test_every_served_method_is_fuzzed(served: dict[str, Rpc]) -> None:
    assert set(EXEMPT) <= set(served), "an exemption names a method the server does not serve"
    assert set(served) - set(EXEMPT) == set(FUZZED)


def _params(paths: list[str]) -> list[Any]:
    return [
        pytest.param(p, marks=pytest.mark.xfail(reason=KNOWN_BROKEN[p], strict=True)) if p in KNOWN_BROKEN else p
        for p in paths
    ]


@pytest.mark.parametrize("path", _params(FUZZED))
def test_fuzz_rpc(world: World, served: dict[str, Rpc], path: str) -> None:
    fuzz(world, path, EXAMPLES_PER_RPC)


# ---------------------------------------------------------------- PostgreSQL, a smaller pass


@pytest.fixture(scope="module")
def pg_world(tmp_path_factory: pytest.TempPathFactory, sleeper: Path) -> Iterator[World]:
    with postgres_schema() as url:
        for world in build_world(tmp_path_factory.mktemp("fuzz-pg"), sleeper, database_url=url):
            world.rpcs = served_methods(world.stubs.channel)
            yield world


#: Where PostgreSQL differs from SQLite: text (NUL, invalid strings) reaching
#: queries and rows, and filters compared against typed columns.
PG_METHODS = [p for p in FUZZED if not p.startswith(LIBRARY_SERVICES)]


@pytest.mark.postgres
@pytest.mark.parametrize("path", PG_METHODS)
def test_fuzz_rpc_postgres(pg_world: World, path: str) -> None:
    fuzz(pg_world, path, max(5, EXAMPLES_PER_RPC // 4))
