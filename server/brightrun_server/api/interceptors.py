"""Server interceptor: request ids, access logs, and domain-error mapping for all
four RPC shapes, so servicers only translate and never build statuses by hand."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from brightrun_server.api.errors import internal_status, to_status, unavailable_status
from brightrun_server.domain import auth, caller
from brightrun_server.domain.errors import DomainError, PermissionDenied

log = logging.getLogger("brightrun_server.access")

if TYPE_CHECKING:  # generic only in the type stubs
    from brightrun_server.services.keys import ApiKeys

    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = aio.ServerInterceptor


class ErrorInterceptor(_Interceptor):
    """Maps DomainError to its status; anything unexpected to INTERNAL with a
    request id that is also in the server log with the traceback."""

    def __init__(self) -> None:
        #: Set during graceful shutdown: new calls get UNAVAILABLE with RetryInfo.
        self.shutting_down = False
        #: Authenticates callers; set by the server once its store is open.
        self.keys: ApiKeys | None = None

    async def _authenticate(self, method: str, context: aio.ServicerContext[Any, Any]) -> None:
        """Set the caller of this RPC from its API key, or refuse the call.

        Fails closed: a method missing from the permission table is refused."""
        if method in auth.PUBLIC:
            caller.set_current(caller.ANONYMOUS)
            return
        if method in auth.ATTEMPT_TOKEN:
            # The servicer checks the attempt token before touching anything;
            # the reports then act for the server itself.
            caller.set_current(caller.SYSTEM)
            return
        required = auth.METHOD_ROLES.get(method)
        if required is None or self.keys is None:
            raise PermissionDenied(f"{method} is not open to callers", reason="ROLE_REQUIRED")
        who = await self.keys.authenticate(_bearer(context))
        self.keys.authorize(who, required, method)
        self.keys.check_rate(who)
        caller.set_current(who)

    async def intercept_service(  # type: ignore[override]  # None for unknown methods at runtime
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        factory: Any
        if handler.unary_unary:
            behavior = self._wrap_unary(method, handler.unary_unary)
            factory = grpc.unary_unary_rpc_method_handler
        elif handler.unary_stream:
            behavior = self._wrap_streaming(method, handler.unary_stream)
            factory = grpc.unary_stream_rpc_method_handler
        elif handler.stream_unary:
            behavior = self._wrap_unary(method, handler.stream_unary)
            factory = grpc.stream_unary_rpc_method_handler
        else:
            behavior = self._wrap_streaming(method, handler.stream_stream)
            factory = grpc.stream_stream_rpc_method_handler
        return factory(  # type: ignore[no-any-return]
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_streaming(self, method: str, behavior: Any) -> Any:
        """A streaming handler is either an async generator (ours) or a coroutine
        that sends with context.write() (grpcio's health Watch); each keeps its style."""
        if inspect.isasyncgenfunction(behavior):
            return self._wrap_stream(method, behavior)
        return self._wrap_unary(method, behavior)

    def _wrap_unary(self, method: str, behavior: Any) -> Any:
        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            access = _Access(method, _request_id(context))
            try:
                if self.shutting_down:
                    access.status = "UNAVAILABLE", "SHUTTING_DOWN"
                    await _abort(context, unavailable_status("server is shutting down", "SHUTTING_DOWN", 1.0))
                try:
                    await self._authenticate(method, context)
                    access.caller = caller.current()
                    response = await behavior(request, context)
                except DomainError as e:
                    access.status = e.code, e.reason
                    await _abort(context, to_status(e, retry_after=getattr(e, "retry_after", None)))
                except aio.AbortError:
                    access.aborted(context)
                    raise
                except NotImplementedError:
                    # A library servicer's way to say so (grpcio's health List).
                    access.status = "UNIMPLEMENTED", ""
                    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
                except Exception:
                    log.exception("unhandled error in %s (request %s)", method, access.request_id)
                    access.status = "INTERNAL", ""
                    await _abort(context, internal_status(access.request_id))
                return response
            except asyncio.CancelledError:
                access.status = "CANCELLED", ""
                raise
            finally:
                access.log()

        return wrapper

    def _wrap_stream(self, method: str, behavior: Any) -> Any:
        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            access = _Access(method, _request_id(context))
            try:
                if self.shutting_down:
                    access.status = "UNAVAILABLE", "SHUTTING_DOWN"
                    await _abort(context, unavailable_status("server is shutting down", "SHUTTING_DOWN", 1.0))
                try:
                    await self._authenticate(method, context)
                    access.caller = caller.current()
                    async for item in behavior(request, context):
                        yield item
                except DomainError as e:
                    access.status = e.code, e.reason
                    await _abort(context, to_status(e, retry_after=getattr(e, "retry_after", None)))
                except aio.AbortError:
                    access.aborted(context)
                    raise
                except NotImplementedError:
                    # A library servicer's way to say so (grpcio's health List).
                    access.status = "UNIMPLEMENTED", ""
                    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
                except Exception:
                    log.exception("unhandled error in %s (request %s)", method, access.request_id)
                    access.status = "INTERNAL", ""
                    await _abort(context, internal_status(access.request_id))
            except (asyncio.CancelledError, GeneratorExit):
                access.status = "CANCELLED", ""
                raise
            finally:
                access.log()

        return wrapper


def _bearer(context: aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _request_id(context: aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex[:16]


async def _abort(context: aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)


class _Access:
    """One access log line per call: its request id, method, outcome, duration
    and caller (key id and project, once authenticated). Never the request's
    contents nor error messages, which may quote a caller's data."""

    __slots__ = ("caller", "method", "request_id", "start", "status")

    def __init__(self, method: str, request_id: str) -> None:
        self.method = method
        self.request_id = request_id
        self.start = time.perf_counter()
        #: (status code name, ErrorInfo reason).
        self.status: tuple[str, str] = ("OK", "")
        self.caller: caller.Caller | None = None

    def aborted(self, context: aio.ServicerContext[Any, Any]) -> None:
        """The call ended by context.abort(); the code was set on the context."""
        if self.status[0] == "OK":
            code = context.code()
            self.status = (code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN", "")

    def log(self) -> None:
        code, reason = self.status
        level = logging.WARNING if code in _ALARMING else logging.INFO
        if not log.isEnabledFor(level):
            return
        who = self.caller
        log.log(
            level,
            "rpc %s %s",
            self.method,
            code,
            extra={
                "request_id": self.request_id,
                "rpc_method": self.method,
                "status": code,
                "reason": reason,
                "duration_ms": round((time.perf_counter() - self.start) * 1000, 2),
                "key_id": who.key_id if who is not None else "",
                "project": who.project if who is not None else "",
                "actor": who.actor if who is not None else "",
            },
        )


#: Outcomes that point at a server problem; logged as warnings.
_ALARMING = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"})
