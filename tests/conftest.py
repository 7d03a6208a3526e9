"""Shared fixtures: a real BrightRun server on port 0, real databases, a real tiny model.

* ``server`` — an in-process server (its own thread and event loop, so sync and
  async clients both work) on SQLite in a temp dir. ``pg_server`` is the same on
  PostgreSQL. ``any_server`` runs a test on both.
* PostgreSQL: set ``BRIGHTRUN_TEST_POSTGRES_URL`` (e.g.
  ``postgresql://postgres@127.0.0.1:5432/test``); each test gets its own schema
  in that database, dropped afterwards. With ``BRIGHTRUN_REQUIRE_POSTGRES=1``
  (set by .ci/run) a missing or unreachable PostgreSQL fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import grpc
import pytest
from grpc import aio

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The admin key of the default project on every test server (its bootstrap
#: key); SDK clients and CLI subprocesses pick it up from the environment.
TEST_API_KEY = "brk_testadmin001_0123456789abcdefghijABCDEFGHIJ0123456789"
os.environ["BRIGHTRUN_API_KEY"] = TEST_API_KEY

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "data"
PG_URL = os.environ.get("BRIGHTRUN_TEST_POSTGRES_URL", "")
REQUIRE_PG = os.environ.get("BRIGHTRUN_REQUIRE_POSTGRES") == "1"

T = TypeVar("T")


def postgres_url_or_skip() -> str:
    if not PG_URL:
        if REQUIRE_PG:
            pytest.fail("BRIGHTRUN_REQUIRE_POSTGRES=1 but BRIGHTRUN_TEST_POSTGRES_URL is not set")
        pytest.skip("set BRIGHTRUN_TEST_POSTGRES_URL to run PostgreSQL tests")
    return PG_URL


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    import sqlalchemy as sa

    base = postgres_url_or_skip()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as e:
        admin.dispose()
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL unreachable at {base}: {e}")
        pytest.skip(f"PostgreSQL unreachable at {base}")
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(autouse=True)
def _no_terminal_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test as under CI, output piped: pytest-xdist workers set
    COLUMNS=80 and LINES=24, which would make the CLI's tables a terminal's width."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    with postgres_schema() as url:
        yield url


class LoopThread:
    """An asyncio loop in a daemon thread; run coroutines on it from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 120) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class ServerHandle:
    """A running server: connect clients to ``address``."""

    address: str
    port: int
    data_dir: Path
    database_url: str
    app: Any  # brightrun_server.app.BrightRunServer
    thread: LoopThread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 120) -> T:
        """Run a coroutine on the server's loop (to reach server internals)."""
        return self.thread.run(coro, timeout)

    def channel(self, api_key: str | None = TEST_API_KEY) -> grpc.Channel:
        """A sync channel that authenticates every call with `api_key`."""
        return auth_channel(self.address, api_key)

    def aio_channel(self, api_key: str | None = TEST_API_KEY) -> aio.Channel:
        """An asyncio channel that authenticates every call with `api_key`."""
        return aio_auth_channel(self.address, api_key)


def auth_channel(
    address: str, api_key: str | None = TEST_API_KEY, credentials: grpc.ChannelCredentials | None = None
) -> grpc.Channel:
    """A sync channel (TLS with `credentials`) that authenticates every call with `api_key`."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, _SyncAuth(api_key)) if api_key else channel


def aio_auth_channel(
    address: str, api_key: str | None = TEST_API_KEY, credentials: grpc.ChannelCredentials | None = None
) -> aio.Channel:
    interceptors = _aio_auth(api_key) if api_key else None
    if credentials:
        return aio.secure_channel(address, credentials, interceptors=interceptors)
    return aio.insecure_channel(address, interceptors=interceptors)


_DETAILS = ["method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"]


class _CallDetails(collections.namedtuple("_CallDetails", _DETAILS), grpc.ClientCallDetails):
    pass


class _SyncAuth(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def _details(self, d: Any) -> Any:
        metadata = [*(d.metadata or ()), ("authorization", f"Bearer {self.api_key}")]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


def _aio_auth(api_key: str) -> list[Any]:
    def details(d: Any) -> Any:
        metadata = aio.Metadata(*(d.metadata or ()), ("authorization", f"Bearer {api_key}"))
        return aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)

    class UnaryUnary(aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, d: Any, request: Any) -> Any:
            return await continuation(details(d), request)

    class UnaryStream(aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, d: Any, request: Any) -> Any:
            return await continuation(details(d), request)

    class StreamUnary(aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, d: Any, request_iterator: Any) -> Any:
            return await continuation(details(d), request_iterator)

    class StreamStream(aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, d: Any, request_iterator: Any) -> Any:
            return await continuation(details(d), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


def start_server(tmp_path: Path, database_url: str | None = None, **settings: Any) -> ServerHandle:
    from brightrun_server.app import BrightRunServer
    from brightrun_server.settings import ServerSettings

    data_dir = tmp_path / "brightrun-data"
    settings.setdefault("bootstrap_api_key", TEST_API_KEY)
    config = ServerSettings(port=0, data_dir=data_dir, database_url=database_url, **settings)
    thread = LoopThread()
    app = BrightRunServer(config)
    try:
        running = thread.run(app.start())
    except BaseException:
        thread.close()
        raise
    return ServerHandle(
        address=f"127.0.0.1:{running.port}",
        port=running.port,
        data_dir=data_dir,
        database_url=config.resolved_database_url,
        app=app,
        thread=thread,
    )


def stop_server(handle: ServerHandle, timeout: float = 30) -> None:
    try:
        handle.run(handle.app.stop(grace=1.0, kill_workers=True), timeout=timeout)
    except TimeoutError:
        _dump_stuck(handle)
        raise
    finally:
        handle.thread.close()


def _dump_stuck(handle: ServerHandle) -> None:
    """Print every task and thread stack of a server that would not stop."""
    import faulthandler
    import io
    import sys

    async def tasks() -> str:
        out = io.StringIO()
        for task in asyncio.all_tasks():
            print(f"--- task {task.get_name()}", file=out)
            awaitable: Any = task.get_coro()
            while awaitable is not None:
                frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
                if frame is not None:
                    print(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}", file=out)
                awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)
        return out.getvalue()

    try:
        print(handle.thread.run(tasks(), timeout=5), file=sys.stderr)
    except Exception as e:  # the loop itself may be blocked
        print(f"could not list tasks: {e!r}", file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path)
    yield handle
    stop_server(handle)


@pytest.fixture
def pg_server(tmp_path: Path, pg_schema_url: str) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path, database_url=pg_schema_url)
    yield handle
    stop_server(handle)


@pytest.fixture(params=["sqlite", "postgres"])
def any_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerHandle]:
    url = request.getfixturevalue("pg_schema_url") if request.param == "postgres" else None
    handle = start_server(tmp_path, database_url=url)
    yield handle
    stop_server(handle)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model + tokenizer saved with save_pretrained, loaded like a hub model."""
    from brightrun_trainer.tiny import build_tiny_model

    return Path(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def chat_dataset() -> Path:
    return EXAMPLES / "support_chat.jsonl"
