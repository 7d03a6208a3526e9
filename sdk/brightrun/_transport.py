"""Call mechanics: channels, metadata, retries (tenacity) and resumable streams.

The only module that differs between sync and async; everything it moves is
built and parsed by :mod:`brightrun._protocol` and :mod:`brightrun.types`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Final, TypeVar

import grpc
import tenacity
from grpc import aio

from brightrun._protocol import FollowState, StreamResume, call_metadata
from brightrun._tls import Pem, channel_credentials
from brightrun.errors import ApiError, ConfigurationError, from_grpc_error
from brightrun.retry import DEFAULT_RETRY, NO_RETRY, CallKind, RetryPolicy
from brightrun.v1 import (
    api_key_service_pb2_grpc,
    dataset_service_pb2_grpc,
    job_service_pb2_grpc,
    project_service_pb2_grpc,
    queue_service_pb2_grpc,
)

log = logging.getLogger("brightrun")

R = TypeVar("R")
T = TypeVar("T")

Metadata = tuple[tuple[str, str], ...]

#: Where clients connect when given no target and no BRIGHTRUN_TARGET.
DEFAULT_TARGET: Final = "127.0.0.1:50051"
TARGET_ENV: Final = "BRIGHTRUN_TARGET"
API_KEY_ENV: Final = "BRIGHTRUN_API_KEY"
API_KEY_FILE_ENV: Final = "BRIGHTRUN_API_KEY_FILE"


class _Default:
    """Sentinel: "use the client's setting"."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("brightrun")
    except Exception:  # pragma: no cover - running from a source tree
        return "0"


def channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    return [
        ("grpc.primary_user_agent", f"brightrun-python/{_version()}"),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        *extra,
    ]


def resolve_target(target: str | None) -> str:
    return target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def resolve_api_key(api_key: str | None) -> str | None:
    """The key to send: `api_key` when given (``""`` sends none), else
    ``$BRIGHTRUN_API_KEY``, else the contents of the file ``$BRIGHTRUN_API_KEY_FILE``
    names (e.g. a fresh server's ``<data dir>/admin-api-key``), else None."""
    if api_key is not None:
        return api_key
    if key := os.environ.get(API_KEY_ENV):
        return key
    if path := os.environ.get(API_KEY_FILE_ENV):
        return read_api_key_file(path)
    return None


def read_api_key_file(path: str | os.PathLike[str]) -> str:
    """The key stored in `path` (surrounding whitespace dropped);
    ConfigurationError when the file cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigurationError(
            f"cannot read the API key file {os.fspath(path)} ({API_KEY_FILE_ENV}): {reason}"
        ) from e
    if not key:
        raise ConfigurationError(f"the API key file {os.fspath(path)} ({API_KEY_FILE_ENV}) is empty")
    return key


def _request_id() -> str:
    return uuid.uuid4().hex[:16]


class _Settings:
    def __init__(
        self,
        target: str | None,
        api_key: str | None,
        timeout: float | None,
        retry: RetryPolicy | _Default | None,
        metadata: Iterable[tuple[str, str]] | None,
    ) -> None:
        self.target = resolve_target(target)
        self.api_key = resolve_api_key(api_key)
        self.timeout = timeout
        self.retry: RetryPolicy = DEFAULT_RETRY if isinstance(retry, _Default) else (retry or NO_RETRY)
        self.metadata: Metadata = tuple((str(k).lower(), str(v)) for k, v in (metadata or ()))

    def call_metadata(self) -> Metadata:
        return call_metadata(self.api_key, self.metadata, _request_id())

    def call_timeout(self, timeout: float | _Default | None) -> float | None:
        return self.timeout if isinstance(timeout, _Default) else timeout

    def retrying_kwargs(self, kind: CallKind) -> dict[str, Any]:
        policy = self.retry

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome is not None else None
            return policy.delay(state.attempt_number, error) if error is not None else policy.backoff(1)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            log.info(
                "retrying after %s (attempt %d of %d, in %.2fs)",
                error,
                state.attempt_number,
                policy.max_attempts,
                delay,
            )

        return {
            "stop": tenacity.stop_after_attempt(policy.max_attempts),
            "wait": wait,
            "retry": tenacity.retry_if_exception(lambda e: policy.should_retry(e, kind)),
            "before_sleep": before_sleep,
            "reraise": True,
        }


class SyncTransport:
    """A sync gRPC channel with the BrightRun stubs, retries and resumable streams."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | _Default | None = DEFAULT,
        metadata: Iterable[tuple[str, str]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool | None = None,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
    ) -> None:
        self.settings = _Settings(target, api_key, timeout, retry, metadata)
        credentials = channel_credentials(
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            credentials=credentials,
        )
        target = self.settings.target
        opts = channel_options(options)
        self.channel = (
            grpc.secure_channel(target, credentials, opts) if credentials else grpc.insecure_channel(target, opts)
        )
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(self.channel)
        self.queue = queue_service_pb2_grpc.QueueServiceStub(self.channel)
        self.projects = project_service_pb2_grpc.ProjectServiceStub(self.channel)
        self.api_keys = api_key_service_pb2_grpc.ApiKeyServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def unary(
        self,
        method: Callable[..., R],
        request: Any,
        *,
        kind: CallKind,
        timeout: float | _Default | None = DEFAULT,
    ) -> R:
        """Call a unary (or stream-unary with a `request` factory) method with retries."""
        return self.invoke(lambda t, md: method(request, timeout=t, metadata=md), kind=kind, timeout=timeout)

    def invoke(
        self,
        attempt: Callable[[float | None, Metadata], R],
        *,
        kind: CallKind,
        timeout: float | _Default | None = DEFAULT,
    ) -> R:
        """Run `attempt(timeout, metadata)` with the retry policy; gRPC errors
        become :class:`~brightrun.ApiError`. Every attempt gets the same
        metadata (so the same x-request-id)."""
        md = self.settings.call_metadata()
        t = self.settings.call_timeout(timeout)

        def once() -> R:
            try:
                return attempt(t, md)
            except grpc.RpcError as e:
                error = from_grpc_error(e)
            raise error

        if self.settings.retry.max_attempts <= 1:
            return once()
        return tenacity.Retrying(**self.settings.retrying_kwargs(kind))(once)

    def stream(
        self,
        open_call: Callable[[int, float | None, Metadata], Any],
        *,
        start: int,
        sequence_of: Callable[[T], int],
        check_done: Callable[[int], tuple[bool, bool]],
        deadline: float | None = None,
    ) -> Iterator[T]:
        """Items of a server stream, resumed from the cursor after errors and
        premature ends, without gaps or duplicates (see StreamResume)."""
        state = StreamResume(self.settings.retry, max(1, start), deadline)
        md = self.settings.call_metadata()
        while True:
            call = open_call(state.cursor, state.open_timeout(), md)
            error: ApiError | None = None
            try:
                for item in call:
                    if state.accept(sequence_of(item)):
                        yield item
            except grpc.RpcError as e:
                error = from_grpc_error(e)
            finally:
                call.cancel()
            delay: float | None
            if error is None:
                try:
                    done, terminal = check_done(state.cursor)
                except ApiError as e:
                    error = e
            if error is None:
                delay = state.after_end(done=done, terminal=terminal)
                if delay is None:
                    return
            else:
                delay = state.after_error(error)
                log.info("stream interrupted (%s); resuming from sequence %d in %.2fs", error, state.cursor, delay)
            time.sleep(delay)

    def follow(
        self,
        open_call: Callable[[float | None, Metadata], Any],
        *,
        key_of: Callable[[T], Any],
        deadline: float | None = None,
    ) -> Iterator[T]:
        """Snapshots of a stream that never ends by itself (WatchQueue),
        reopened after errors and ends (see FollowState) until `deadline`."""
        state = FollowState(self.settings.retry, deadline)
        md = self.settings.call_metadata()
        while not state.expired():
            call = open_call(state.open_timeout(), md)
            error: ApiError | None = None
            try:
                for item in call:
                    if state.accept(key_of(item)):
                        yield item
            except grpc.RpcError as e:
                error = from_grpc_error(e)
            finally:
                call.cancel()
            if state.expired():
                return
            delay = state.after_end() if error is None else state.after_error(error)
            if error is not None:
                log.info("stream interrupted (%s); reopening in %.2fs", error, delay)
            time.sleep(delay)

    def stream_once(self, open_call: Callable[[float | None, Metadata], Any]) -> Iterator[Any]:
        """A server stream without a cursor: retried (as a read) only until its
        first message arrives; a break after that is raised."""
        md = self.settings.call_metadata()
        attempt = 0
        while True:
            attempt += 1
            call = open_call(None, md)
            received = False
            error: ApiError | None = None
            try:
                for item in call:
                    received = True
                    yield item
                return
            except grpc.RpcError as e:
                error = from_grpc_error(e)
            finally:
                call.cancel()
            policy = self.settings.retry
            if received or attempt >= policy.max_attempts or not policy.should_retry(error, CallKind.READ):
                raise error
            time.sleep(policy.delay(attempt, error))


class AsyncTransport:
    """The ``grpc.aio`` twin of :class:`SyncTransport`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | _Default | None = DEFAULT,
        metadata: Iterable[tuple[str, str]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool | None = None,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
    ) -> None:
        self.settings = _Settings(target, api_key, timeout, retry, metadata)
        credentials = channel_credentials(
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            credentials=credentials,
        )
        self._credentials = credentials
        self._options = channel_options(options)
        self._channel: aio.Channel | None = None
        self._jobs: job_service_pb2_grpc.JobServiceAsyncStub | None = None
        self._datasets: dataset_service_pb2_grpc.DatasetServiceAsyncStub | None = None
        self._queue: queue_service_pb2_grpc.QueueServiceAsyncStub | None = None
        self._projects: project_service_pb2_grpc.ProjectServiceAsyncStub | None = None
        self._api_keys: api_key_service_pb2_grpc.ApiKeyServiceAsyncStub | None = None
        self._closed = False

    # The channel is made on first use, inside the event loop that uses it, so
    # an AsyncClient may be created anywhere (module level, sync code) without
    # grpc.aio binding it to — or creating — some other loop.
    @property
    def channel(self) -> aio.Channel:
        if self._closed:
            raise RuntimeError("this AsyncClient is closed")
        if self._channel is None:
            target, opts = self.settings.target, self._options
            self._channel = (
                aio.secure_channel(target, self._credentials, opts)
                if self._credentials
                else aio.insecure_channel(target, opts)
            )
        return self._channel

    @property
    def jobs(self) -> job_service_pb2_grpc.JobServiceAsyncStub:
        if self._jobs is None:
            self._jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        return self._jobs

    @property
    def datasets(self) -> dataset_service_pb2_grpc.DatasetServiceAsyncStub:
        if self._datasets is None:
            self._datasets = dataset_service_pb2_grpc.DatasetServiceStub(self.channel)
        return self._datasets

    @property
    def queue(self) -> queue_service_pb2_grpc.QueueServiceAsyncStub:
        if self._queue is None:
            self._queue = queue_service_pb2_grpc.QueueServiceStub(self.channel)
        return self._queue

    @property
    def projects(self) -> project_service_pb2_grpc.ProjectServiceAsyncStub:
        if self._projects is None:
            self._projects = project_service_pb2_grpc.ProjectServiceStub(self.channel)
        return self._projects

    @property
    def api_keys(self) -> api_key_service_pb2_grpc.ApiKeyServiceAsyncStub:
        if self._api_keys is None:
            self._api_keys = api_key_service_pb2_grpc.ApiKeyServiceStub(self.channel)
        return self._api_keys

    async def close(self) -> None:
        self._closed = True
        channel, self._channel = self._channel, None
        self._jobs = self._datasets = None
        self._queue = None
        self._projects = None
        self._api_keys = None
        if channel is not None:
            await channel.close(None)

    async def unary(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        *,
        kind: CallKind,
        timeout: float | _Default | None = DEFAULT,  # noqa: ASYNC109 - a gRPC deadline per attempt
    ) -> R:
        return await self.invoke(lambda t, md: method(request, timeout=t, metadata=md), kind=kind, timeout=timeout)

    async def invoke(
        self,
        attempt: Callable[[float | None, Metadata], Awaitable[R]],
        *,
        kind: CallKind,
        timeout: float | _Default | None = DEFAULT,  # noqa: ASYNC109 - a gRPC deadline per attempt
    ) -> R:
        md = self.settings.call_metadata()
        t = self.settings.call_timeout(timeout)

        async def once() -> R:
            try:
                return await attempt(t, md)
            except grpc.RpcError as e:
                error = from_grpc_error(e)
            raise error

        if self.settings.retry.max_attempts <= 1:
            return await once()
        retrying = tenacity.AsyncRetrying(**self.settings.retrying_kwargs(kind))
        return await retrying(once)

    async def stream(
        self,
        open_call: Callable[[int, float | None, Metadata], Any],
        *,
        start: int,
        sequence_of: Callable[[T], int],
        check_done: Callable[[int], Awaitable[tuple[bool, bool]]],
        deadline: float | None = None,
    ) -> AsyncIterator[T]:
        state = StreamResume(self.settings.retry, max(1, start), deadline)
        md = self.settings.call_metadata()
        while True:
            call = open_call(state.cursor, state.open_timeout(), md)
            error: ApiError | None = None
            try:
                async for item in call:
                    if state.accept(sequence_of(item)):
                        yield item
            except grpc.RpcError as e:
                error = from_grpc_error(e)
            finally:
                call.cancel()
            delay: float | None
            if error is None:
                try:
                    done, terminal = await check_done(state.cursor)
                except ApiError as e:
                    error = e
            if error is None:
                delay = state.after_end(done=done, terminal=terminal)
                if delay is None:
                    return
            else:
                delay = state.after_error(error)
                log.info("stream interrupted (%s); resuming from sequence %d in %.2fs", error, state.cursor, delay)
            await asyncio.sleep(delay)

    async def follow(
        self,
        open_call: Callable[[float | None, Metadata], Any],
        *,
        key_of: Callable[[T], Any],
        deadline: float | None = None,
    ) -> AsyncIterator[T]:
        """See :meth:`SyncTransport.follow`."""
        state = FollowState(self.settings.retry, deadline)
        md = self.settings.call_metadata()
        while not state.expired():
            call = open_call(state.open_timeout(), md)
            error: ApiError | None = None
            try:
                async for item in call:
                    if state.accept(key_of(item)):
                        yield item
            except grpc.RpcError as e:
                error = from_grpc_error(e)
            finally:
                call.cancel()
            if state.expired():
                return
            delay = state.after_end() if error is None else state.after_error(error)
            if error is not None:
                log.info("stream interrupted (%s); reopening in %.2fs", error, delay)
            await asyncio.sleep(delay)

    async def stream_once(self, open_call: Callable[[float | None, Metadata], Any]) -> AsyncIterator[Any]:
        """A server stream without a cursor; see :meth:`SyncTransport.stream_once`."""
        md = self.settings.call_metadata()
        attempt = 0
        while True:
            attempt += 1
            call = open_call(None, md)
            received = False
            error: ApiError | None = None
            try:
                async for item in call:
                    received = True
                    yield item
                return
            except grpc.RpcError as e:
                error = from_grpc_error(e)
            finally:
                call.cancel()
            policy = self.settings.retry
            if received or attempt >= policy.max_attempts or not policy.should_retry(error, CallKind.READ):
                raise error
            await asyncio.sleep(policy.delay(attempt, error))
