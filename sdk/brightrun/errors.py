"""Exceptions, in the style of google api-core's ``exceptions.py``.

Every error the SDK raises derives from :class:`BrightRunError`. A failed RPC
raises the :class:`ApiError` subclass registered for its gRPC status code
(``NOT_FOUND`` → :class:`NotFoundError`, ...), carrying the structured details
the server sends in its ``google.rpc.Status`` (AIP-193):

>>> try:
...     client.jobs.get("job_missing")
... except brightrun.NotFoundError as e:
...     e.reason, e.metadata            # ('JOB_NOT_FOUND', {'job_id': 'job_missing'})

Calls the server refuses for their API key raise :class:`AuthenticationError`
(``UNAUTHENTICATED``; :attr:`~AuthenticationError.problem` says whether the key
is missing, invalid, expired or revoked, and the message what to do), calls
above the key's role :class:`PermissionDeniedError` (``ROLE_REQUIRED``, with
:attr:`~PermissionDeniedError.required_role` and
:attr:`~PermissionDeniedError.role`).

A job that fails is data, not an RPC error: ``job.wait()`` returns it and
``job.raise_for_status()`` raises :class:`JobFailedError` /
:class:`JobCancelledError`. A job whose automatic recovery gave up makes
``job.wait()`` raise :class:`JobNeedsDecision` (answer with ``job.decide()``);
``job.retry_with_suggested_fix()`` raises :class:`NoApplicableFixError` when
every suggested fix needs the user's action first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    from brightrun.enums import FailureClass, RecoveryChoice, Role
    from brightrun.types import JobBase, JobFailure, RecoveryFix

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "ApiError",
    "AuthenticationError",
    "BrightRunError",
    "CancelledError",
    "ConfigurationError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobNeedsDecision",
    "NoApplicableFixError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "WaitTimeout",
    "error_class",
    "from_grpc_error",
    "from_status",
]

#: The `ErrorInfo.domain` BrightRun servers use.
DOMAIN = "brightrun.dev"

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class BrightRunError(Exception):
    """Base class of every exception the SDK raises."""


class ConfigurationError(BrightRunError, ValueError):
    """The client's settings cannot be used, e.g. ``BRIGHTRUN_API_KEY_FILE``
    names a file that cannot be read; raised when the client is created."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field: `field` is its path, e.g. ``overrides.lora_rank``."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {}
#: Codes whose message should carry the server's correlation id.
_SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


class ApiError(BrightRunError):
    """A failed RPC. Subclasses are registered per gRPC status code.

    Attributes:
        code: the gRPC status code.
        message: the server's message (or gRPC's, when the call never reached it).
        reason: ``ErrorInfo.reason`` in UPPER_SNAKE_CASE (e.g. ``JOB_NOT_FOUND``),
            or ``None`` when the status carried no ErrorInfo.
        domain: ``ErrorInfo.domain`` (``brightrun.dev``) or ``None``.
        metadata: ``ErrorInfo.metadata`` — identifiers named by the reason.
        field_violations: one :class:`FieldViolation` per invalid request field.
        retry_delay: the server's ``RetryInfo.retry_delay``, when it suggests a retry.
        request_id: the server's correlation id for the request (sent with
            INTERNAL errors), or ``None``.
        status: the raw ``google.rpc.Status``, when the server sent one.
    """

    #: The status code this class stands for; set on each subclass.
    grpc_status_code: ClassVar[grpc.StatusCode | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        domain: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: timedelta | None = None,
        status: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code or self.grpc_status_code or grpc.StatusCode.UNKNOWN
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[FieldViolation] = list(field_violations)
        self.retry_delay = retry_delay
        self.status = status

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("grpc_status_code")
        if code is not None:
            _BY_CODE.setdefault(code, cls)

    @property
    def request_id(self) -> str | None:
        """The server's correlation id for this request, if it sent one."""
        return self.metadata.get("request_id") or None

    def __str__(self) -> str:
        text = self.message or self.code.name.lower().replace("_", " ")
        missing = [v for v in self.field_violations if v.description not in text]
        if missing:
            text += " [" + "; ".join(str(v) for v in missing) + "]"
        text += f" ({self.reason or self.code.name})"
        if self.request_id and (self.code in _SERVER_FAULTS or self.reason == "INTERNAL"):
            text += f" [request id {self.request_id}]"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name}, reason={self.reason!r})"

    def __reduce__(self) -> Any:  # pickling (e.g. across process pools) keeps the details
        return (
            _rebuild,
            (
                type(self),
                self.message,
                self.code.name,
                self.reason,
                self.domain,
                self.metadata,
                self.field_violations,
                self.retry_delay,
            ),
        )


def _rebuild(cls: type[ApiError], message: str, code: str, *args: Any) -> ApiError:
    reason, domain, metadata, violations, delay = args
    return cls(
        message,
        code=grpc.StatusCode[code],
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        retry_delay=delay,
    )


class CancelledError(ApiError):
    """The call was cancelled (``CANCELLED``)."""

    grpc_status_code = grpc.StatusCode.CANCELLED


class UnknownError(ApiError):
    """``UNKNOWN``."""

    grpc_status_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(ApiError):
    """A request field is invalid; see :attr:`field_violations` (``INVALID_ARGUMENT``)."""

    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(ApiError):
    """The call did not finish before its deadline (``DEADLINE_EXCEEDED``)."""

    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(ApiError):
    """The job, dataset or other resource does not exist (``NOT_FOUND``)."""

    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ApiError):
    """``ALREADY_EXISTS``."""

    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(ApiError):
    """The caller may not make this call (``PERMISSION_DENIED``). For reason
    ``ROLE_REQUIRED`` the key's role is too low: :attr:`required_role` is the
    role the call needs, :attr:`role` the key's, :attr:`method` the RPC."""

    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED

    @property
    def required_role(self) -> Role | None:
        """The role the call needs (``ROLE_REQUIRED``), else None."""
        return _role(self.metadata.get("required_role"))

    @property
    def role(self) -> Role | None:
        """The calling key's role (``ROLE_REQUIRED``), else None."""
        return _role(self.metadata.get("role"))

    @property
    def method(self) -> str | None:
        """The refused RPC's full name, e.g. ``/brightrun.v1.ApiKeyService/CreateApiKey``."""
        return self.metadata.get("method") or None

    def __str__(self) -> str:
        text = super().__str__()
        if self.reason == "ROLE_REQUIRED" and self.required_role is not None:
            text += f"; ask an admin of the project for a key with the {self.required_role} role"
        return text


class ResourceExhaustedError(ApiError):
    """A quota or rate limit was hit; :attr:`retry_delay` says when to retry (``RESOURCE_EXHAUSTED``)."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(ApiError):
    """The system is not in a state that allows the call, e.g. an invalid dataset (``FAILED_PRECONDITION``)."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(ApiError):
    """A concurrent change won; retry the whole operation (``ABORTED``)."""

    grpc_status_code = grpc.StatusCode.ABORTED


class OutOfRangeError(ApiError):
    """``OUT_OF_RANGE``."""

    grpc_status_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(ApiError):
    """The server does not implement the call (an older server?) (``UNIMPLEMENTED``)."""

    grpc_status_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(ApiError):
    """A server bug; quote :attr:`request_id` when reporting it (``INTERNAL``)."""

    grpc_status_code = grpc.StatusCode.INTERNAL


class UnavailableError(ApiError):
    """The server cannot be reached or is shutting down (``UNAVAILABLE``)."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(ApiError):
    """``DATA_LOSS``."""

    grpc_status_code = grpc.StatusCode.DATA_LOSS


#: What a user can do about each ``UNAUTHENTICATED`` problem.
_AUTH_HINTS = {
    "missing": (
        "pass api_key=..., set BRIGHTRUN_API_KEY, or set BRIGHTRUN_API_KEY_FILE to a file holding the key "
        "(a fresh local server writes its first admin key to <data dir>/admin-api-key)"
    ),
    "invalid": (
        "check the key in api_key= / BRIGHTRUN_API_KEY / BRIGHTRUN_API_KEY_FILE: keys look like brk_<id>_<secret> "
        "and work only on the server that made them (a fresh local server writes its first admin key to "
        "<data dir>/admin-api-key)"
    ),
    "expired": "ask an admin of the project for a new key (`brightrun keys create NAME`)",
    "revoked": "ask an admin of the project for a new key (`brightrun keys create NAME`)",
}


class AuthenticationError(ApiError):
    """The server did not accept the call's API key (``UNAUTHENTICATED``).

    :attr:`problem` is ``"missing"``, ``"invalid"``, ``"expired"`` or
    ``"revoked"`` (from reasons ``API_KEY_MISSING``, ... ; any other reason
    as it is); :attr:`reason` stays the server's UPPER_SNAKE reason, as on
    every :class:`ApiError`. The message says what to do about it.
    """

    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED

    @property
    def problem(self) -> str | None:
        """What is wrong with the key: missing, invalid, expired, revoked (or the raw reason)."""
        if self.reason is None:
            return None
        return self.reason.removeprefix("API_KEY_").lower() if self.reason in _AUTH_REASONS else self.reason

    @property
    def hint(self) -> str | None:
        """What the user can do about it, or None."""
        return _AUTH_HINTS.get(self.problem or "")

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}; {self.hint}" if self.hint else text


_AUTH_REASONS = frozenset({"API_KEY_MISSING", "API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_REVOKED"})

#: The name this class had before API keys; both catch the same errors.
UnauthenticatedError = AuthenticationError


def _role(value: str | None) -> Role | None:
    from brightrun.enums import Role

    if not value:
        return None
    try:
        return Role.parse(value)
    except ValueError:
        return None


def error_class(code: grpc.StatusCode) -> type[ApiError]:
    """The exception class registered for `code` (``ApiError`` if none is)."""
    return _BY_CODE.get(code, ApiError)


def from_status(status: status_pb2.Status, *, code: grpc.StatusCode | None = None) -> ApiError:
    """The typed exception for a ``google.rpc.Status`` and its details."""
    code = code or _code_from_number(status.code)
    reason = domain = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    delay: timedelta | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain = info.reason or None, info.domain or None
            metadata.update(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            detail.Unpack(info_retry)
            delay = info_retry.retry_delay.ToTimedelta()
        elif detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
            request = error_details_pb2.RequestInfo()
            detail.Unpack(request)
            if request.request_id:
                metadata.setdefault("request_id", request.request_id)
    return error_class(code)(
        status.message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        retry_delay=delay,
        status=status,
    )


def from_grpc_error(error: grpc.RpcError) -> ApiError:
    """The typed exception for a failed gRPC call (sync or ``grpc.aio``)."""
    call: Any = error
    code = call.code() if callable(getattr(call, "code", None)) else grpc.StatusCode.UNKNOWN
    details = call.details() if callable(getattr(call, "details", None)) else None
    status = None
    try:
        status = rpc_status.from_call(call)
    except (ValueError, DecodeError, AttributeError, TypeError):
        # A status whose code/message disagree with the call's, or no trailers:
        # fall back to the bare code and message below.
        status = _status_from_trailers(_trailers(call))
    if status is not None:
        return from_status(status, code=code)
    return error_class(code)(details or "", code=code)


def _trailers(call: Any) -> Iterable[tuple[str, Any]]:
    try:
        return tuple(call.trailing_metadata() or ())
    except Exception:
        return ()


def _status_from_trailers(trailers: Iterable[tuple[str, Any]]) -> status_pb2.Status | None:
    for key, value in trailers:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def _code_from_number(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


# ------------------------------------------------------------------ client-side


class WaitTimeout(BrightRunError, TimeoutError):
    """``job.wait(timeout=...)`` ran out of time; :attr:`job` is the last state seen."""

    def __init__(self, message: str, *, job: JobBase | None = None, timeout: float | None = None) -> None:
        super().__init__(message)
        self.job = job
        self.timeout = timeout


class JobError(BrightRunError):
    """A job did not complete: it failed or was cancelled (``job.raise_for_status()``),
    or it awaits a decision (``job.wait()``). :attr:`job` is its last state seen."""

    def __init__(self, message: str, *, job: JobBase) -> None:
        super().__init__(message)
        self.job = job

    @property
    def failure(self) -> JobFailure | None:
        """The job's failure record (None for a cancelled job)."""
        return self.job.failure


class JobFailedError(JobError):
    """The job FAILED; :attr:`failure` says why."""


class JobCancelledError(JobError):
    """The job was CANCELLED."""


class JobNeedsDecision(JobError):
    """``job.wait()`` found the job AWAITING_DECISION: automatic recovery gave up
    and the job waits for ``job.decide(choice)``. :attr:`choices` are the
    choices it offers, :attr:`reason` why recovery stopped."""

    @property
    def choices(self) -> tuple[RecoveryChoice, ...]:
        return self.job.decision.choices if self.job.decision is not None else ()

    @property
    def reason(self) -> str:
        return self.job.decision.reason if self.job.decision is not None else self.job.state_message


class NoApplicableFixError(BrightRunError):
    """``job.retry_with_suggested_fix()`` found no fix a retry can apply: every
    suggested fix needs a user's action first (e.g. a corrected dataset).
    :attr:`fixes` holds what the server suggested."""

    def __init__(
        self, message: str, *, job: JobBase, fixes: tuple[RecoveryFix, ...], failure_class: FailureClass
    ) -> None:
        super().__init__(message)
        self.job = job
        self.fixes = fixes
        self.failure_class = failure_class
