"""API-key plumbing shared by the benchmarks that start their own server.

Each run makes a fresh admin key, hands it to the server as its bootstrap key,
and sends it on every call, as a real client does. The per-key rate limit is
turned off in the benchmark servers: they measure the control plane, not the
limiter (whose refusals are covered by tests/server/test_auth.py)."""

from __future__ import annotations

import os
import secrets
import string
from typing import Any

import grpc
from grpc import aio

_ALNUM = string.ascii_letters + string.digits


def new_api_key() -> str:
    key_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
    return f"brk_{key_id}_{''.join(secrets.choice(_ALNUM) for _ in range(40))}"


#: This run's admin key.
API_KEY = new_api_key()
METADATA = (("authorization", f"Bearer {API_KEY}"),)


def server_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "BRIGHTRUN_BOOTSTRAP_API_KEY": API_KEY,
        "BRIGHTRUN_RATE_LIMIT_PER_SECOND": "0",
        **extra,
    }


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, d: Any) -> None:
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = d.wait_for_ready, d.compression
        self.metadata = [*(d.metadata or ()), *METADATA]


class _SyncAuth(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details), request)


def channel(address: str) -> grpc.Channel:
    return grpc.intercept_channel(grpc.insecure_channel(address), _SyncAuth())


def _aio_details(d: Any) -> aio.ClientCallDetails:
    return aio.ClientCallDetails(
        d.method, d.timeout, aio.Metadata(*(d.metadata or ()), *METADATA), d.credentials, d.wait_for_ready
    )


class _UnaryUnary(aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details), request)


class _UnaryStream(aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details), request)


class _StreamUnary(aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_aio_details(details), request_iterator)


def aio_channel(address: str) -> aio.Channel:
    """An asyncio channel that sends this run's key on every call."""
    return aio.insecure_channel(address, interceptors=[_UnaryUnary(), _UnaryStream(), _StreamUnary()])
