"""``brightrun.Client`` (sync) and ``brightrun.AsyncClient`` (``grpc.aio``).

>>> import brightrun
>>> with brightrun.Client("127.0.0.1:50051") as client:
...     ds = client.datasets.upload("support_chat.jsonl")
...     job = client.jobs.create(dataset=ds, base_model="meta-llama/Llama-3.2-1B", lora_rank=8)
...     job.wait().raise_for_status()

Both take the same arguments and expose the same resources (``datasets``,
``jobs``, ``queue``, ``projects``, ``api_keys``) and ``whoami()``; the async
one's methods are coroutines and its streams async iterators.

Every call but the health check needs an API key. The client sends, in this
order of precedence: ``api_key=`` (``""`` sends none), ``$BRIGHTRUN_API_KEY``,
then the contents of the file ``$BRIGHTRUN_API_KEY_FILE`` names (e.g. a fresh
local server's ``<data dir>/admin-api-key``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from brightrun._tls import Pem
from brightrun._transport import AsyncTransport, SyncTransport
from brightrun.errors import UnavailableError
from brightrun.resources import (
    ApiKeys,
    AsyncApiKeys,
    AsyncDatasets,
    AsyncJobs,
    AsyncProjects,
    AsyncQueue,
    Datasets,
    Jobs,
    Projects,
    Queue,
)
from brightrun.retry import DEFAULT_RETRY, CallKind, RetryPolicy
from brightrun.types import Caller
from brightrun.v1 import api_key_service_pb2

__all__ = ["AsyncClient", "Client"]


class Client:
    """A connection to a BrightRun server.

    Args:
        target: ``host:port`` of the server; defaults to ``$BRIGHTRUN_TARGET``,
            then ``127.0.0.1:50051``.
        api_key: sent as ``authorization: Bearer <key>``; defaults to
            ``$BRIGHTRUN_API_KEY``, then to the contents of the file
            ``$BRIGHTRUN_API_KEY_FILE`` names (ConfigurationError if it
            cannot be read). ``""`` sends no key.
        timeout: seconds each unary call attempt may take (``None``: no limit).
            Streams and ``wait()`` have their own timeouts.
        retry: when and how to retry failed calls and reconnect streams
            (see :mod:`brightrun.retry`); ``None`` disables both.
        metadata: extra gRPC metadata sent with every call.
        tls: ``True`` connects over TLS, verifying the server with the
            system's CAs (or ``root_certificates``); ``False`` forces plaintext.
            By default TLS is on when any certificate is given, here or in
            ``$BRIGHTRUN_TLS_CA`` / ``$BRIGHTRUN_TLS_CERT`` / ``$BRIGHTRUN_TLS_KEY``
            (or ``$BRIGHTRUN_TLS=1``).
        root_certificates: the CA that signed the server's certificate: a PEM
            file's path or its bytes; defaults to ``$BRIGHTRUN_TLS_CA``.
        client_cert, client_key: a client certificate and its key (paths or
            PEM bytes) for servers that require mutual TLS; default to
            ``$BRIGHTRUN_TLS_CERT`` and ``$BRIGHTRUN_TLS_KEY``.
        credentials: ready-made channel credentials, instead of the TLS
            options above.
        options: extra gRPC channel options.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        metadata: Iterable[tuple[str, str]] | None = None,
        tls: bool | None = None,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._transport = SyncTransport(
            target,
            api_key=api_key,
            timeout=timeout,
            retry=retry,
            metadata=metadata,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            credentials=credentials,
            options=options,
        )
        #: Datasets: ``upload``, ``get``, ``list``, ``delete``.
        self.datasets = Datasets(self._transport)
        #: Jobs: ``create``, ``get``, ``list``, ``cancel``, ``wait``, streams,
        #: pause/resume, retries and fixes, continuations, failure reports,
        #: decisions, ``export``, ``bulk_cancel``.
        self.jobs = Jobs(self._transport)
        #: The queue: ``get``, ``watch``, ``promote``, ``audit``.
        self.queue = Queue(self._transport, self.jobs)
        #: The caller's project: ``usage``.
        self.projects = Projects(self._transport)
        #: The project's API keys (admin only): ``create``, ``list``, ``revoke``.
        self.api_keys = ApiKeys(self._transport)

    def whoami(self) -> Caller:
        """Who this client is to the server: its project, role and API key
        (AuthenticationError when the key is missing, unknown, expired or revoked)."""
        request = api_key_service_pb2.GetCallerRequest()
        return Caller.from_proto(self._transport.unary(self._transport.api_keys.GetCaller, request, kind=CallKind.READ))

    @property
    def target(self) -> str:
        """The server address this client talks to."""
        return self._transport.settings.target

    @property
    def retry(self) -> RetryPolicy:
        return self._transport.settings.retry

    def wait_until_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; UnavailableError after `timeout` s."""
        try:
            grpc.channel_ready_future(self._transport.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise UnavailableError(f"no BrightRun server answered at {self.target} within {timeout:g}s") from None

    def close(self) -> None:
        """Close the channel; streams in progress end."""
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(target={self.target!r})"


class AsyncClient:
    """A ``grpc.aio`` connection to a BrightRun server; arguments as :class:`Client`.

    Use it as ``async with brightrun.AsyncClient() as client:`` or call
    ``await client.close()``.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        metadata: Iterable[tuple[str, str]] | None = None,
        tls: bool | None = None,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._transport = AsyncTransport(
            target,
            api_key=api_key,
            timeout=timeout,
            retry=retry,
            metadata=metadata,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            credentials=credentials,
            options=options,
        )
        #: Datasets: ``upload``, ``get``, ``list``, ``delete``.
        self.datasets = AsyncDatasets(self._transport)
        #: Jobs: as :attr:`Client.jobs`.
        self.jobs = AsyncJobs(self._transport)
        #: The queue: ``get``, ``watch``, ``promote``, ``audit``.
        self.queue = AsyncQueue(self._transport, self.jobs)
        #: The caller's project: ``usage``.
        self.projects = AsyncProjects(self._transport)
        #: The project's API keys (admin only): ``create``, ``list``, ``revoke``.
        self.api_keys = AsyncApiKeys(self._transport)

    async def whoami(self) -> Caller:
        """Who this client is to the server; see :meth:`Client.whoami`."""
        request = api_key_service_pb2.GetCallerRequest()
        response = await self._transport.unary(self._transport.api_keys.GetCaller, request, kind=CallKind.READ)
        return Caller.from_proto(response)

    @property
    def target(self) -> str:
        """The server address this client talks to."""
        return self._transport.settings.target

    @property
    def retry(self) -> RetryPolicy:
        return self._transport.settings.retry

    async def wait_until_ready(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - mirrors Client
        """Wait until the channel is connected; UnavailableError after `timeout` s."""
        try:
            await asyncio.wait_for(self._transport.channel.channel_ready(), timeout)
        except TimeoutError:
            raise UnavailableError(f"no BrightRun server answered at {self.target} within {timeout:g}s") from None

    async def close(self) -> None:
        """Close the channel; streams in progress end."""
        await self._transport.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient(target={self.target!r})"
