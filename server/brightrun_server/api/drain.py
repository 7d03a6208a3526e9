"""Counts the calls in flight, so a graceful shutdown can let them finish.

grpc's own `server.stop(grace)` refuses new calls at the transport, where a
client cannot tell a shutdown from a dead server. BrightRun's shutdown drains
first: while the server still accepts connections, new calls are answered
UNAVAILABLE / SHUTTING_DOWN with RetryInfo (by the ErrorInterceptor), open
streams end with that status (FeedHub.close), and the calls already running
finish; only then does the transport stop. This interceptor, first in the
chain, keeps the count the drain waits on.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = aio.ServerInterceptor

#: How often wait_idle looks at the count.
POLL_SECONDS = 0.02


class DrainInterceptor(_Interceptor):
    def __init__(self) -> None:
        #: Calls whose handler is running.
        self.active = 0

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 - a drain budget, not a call timeout
        """Wait until no call is in flight, for at most `timeout` seconds; True if none is."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter, polled briefly
            await asyncio.sleep(POLL_SECONDS)
        return not self.active

    async def intercept_service(  # type: ignore[override]  # None for unknown methods at runtime
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        factory: Any
        if handler.unary_unary:
            behavior, factory = self._unary(handler.unary_unary), grpc.unary_unary_rpc_method_handler
        elif handler.unary_stream:
            behavior, factory = self._streaming(handler.unary_stream), grpc.unary_stream_rpc_method_handler
        elif handler.stream_unary:
            behavior, factory = self._unary(handler.stream_unary), grpc.stream_unary_rpc_method_handler
        else:
            behavior, factory = self._streaming(handler.stream_stream), grpc.stream_stream_rpc_method_handler
        return factory(  # type: ignore[no-any-return]
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _streaming(self, behavior: Any) -> Any:
        # An async generator, or a coroutine sending with context.write() (grpcio's health Watch).
        return self._stream(behavior) if inspect.isasyncgenfunction(behavior) else self._unary(behavior)

    def _unary(self, behavior: Any) -> Any:
        async def counted(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            self.active += 1
            try:
                return await behavior(request, context)
            finally:
                self.active -= 1

        return counted

    def _stream(self, behavior: Any) -> Any:
        async def counted(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            self.active += 1
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self.active -= 1

        return counted
