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
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc import aio

from brightrun.v1 import trainer_service_pb2
from brightrun_server.api.errors import internal_status, to_status, unavailable_status
from brightrun_server.domain import auth, caller
from brightrun_server.domain.errors import DomainError, FieldViolation, InvalidArgument, PermissionDenied

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
                    response = await behavior(_checked(request), context)
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
                    async for item in behavior(_checked(request), context):
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


def _checked(request: Any) -> Any:
    """The request, refused (INVALID_ARGUMENT naming the field) when a string in
    it holds a NUL character: no store keeps one (PostgreSQL text cannot) and
    no name or id needs one. Request streams are checked message by message.
    A trainer's reports are not refused (a log tail may hold any byte, and a
    refused report would be resent forever): their NULs become U+FFFD."""
    if isinstance(request, trainer_service_pb2.ReportAttemptRequest):
        scrub_nul(request)
        return request
    if isinstance(request, Message):
        violations = nul_violations(request)
        if violations:
            raise InvalidArgument(violations)
        return request
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in requests:
        if isinstance(message, Message):
            violations = nul_violations(message)
            if violations:
                raise InvalidArgument(violations)
        yield message


NUL_MESSAGE = "must not contain NUL (\\0) characters"


def scrub_nul(message: Message) -> None:
    """Replace NUL with U+FFFD in every string of `message`, in place."""
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                if any("\x00" in v for v in value):
                    value[:] = [v.replace("\x00", "\ufffd") for v in value]
            elif "\x00" in value:
                setattr(message, field.name, value.replace("\x00", "\ufffd"))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key in list(value):
                    item = value[key]
                    if isinstance(item, Message):
                        scrub_nul(item)
                    elif isinstance(item, str) and "\x00" in item:
                        value[key] = item.replace("\x00", "\ufffd")
            elif field.is_repeated:
                for item in value:
                    scrub_nul(item)
            else:
                scrub_nul(value)


def nul_violations(message: Message, prefix: str = "") -> list[FieldViolation]:
    """A violation for every string field (at any depth) that contains NUL."""
    found: list[FieldViolation] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                found += [FieldViolation(f"{path}[{i}]", NUL_MESSAGE) for i, v in enumerate(value) if "\x00" in v]
            elif "\x00" in value:
                found.append(FieldViolation(path, NUL_MESSAGE))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if isinstance(key, str) and "\x00" in key:
                        found.append(FieldViolation(f"{path}", "keys must not contain NUL (\\0) characters"))
                    if isinstance(item, str) and "\x00" in item:
                        found.append(FieldViolation(f"{path}[{key!r}]", NUL_MESSAGE))
                    elif isinstance(item, Message):
                        found += nul_violations(item, f"{path}[{key!r}].")
            elif field.is_repeated:
                for i, item in enumerate(value):
                    found += nul_violations(item, f"{path}[{i}].")
            else:
                found += nul_violations(value, f"{path}.")
    return found


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
