"""Domain errors. The API layer maps each to a gRPC status with structured details.

Every error carries a `reason` (an `ErrorReason` value name without its prefix, see
proto/brightrun/v1/errors.proto) and `metadata`; invalid arguments carry one
:class:`FieldViolation` per bad field. The domain never imports grpc.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field: `field` is its path, e.g. `overrides.lora_rank`."""

    field: str
    description: str


class DomainError(Exception):
    """Base class: a request the domain refuses."""

    #: gRPC status code name, e.g. "NOT_FOUND"; the API layer maps it.
    code = "UNKNOWN"
    reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(DomainError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(f"invalid request: {summary}", reason=reason, metadata=metadata)


class NotFound(DomainError):
    code = "NOT_FOUND"

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(
            f"{kind} {resource_id!r} not found",
            reason=f"{kind.upper()}_NOT_FOUND",
            metadata={f"{kind}_id": resource_id},
        )


class FailedPrecondition(DomainError):
    code = "FAILED_PRECONDITION"


class AlreadyExists(DomainError):
    code = "ALREADY_EXISTS"


class Aborted(DomainError):
    """A concurrent change won; the client may retry the whole operation."""

    code = "ABORTED"


class Unauthenticated(DomainError):
    code = "UNAUTHENTICATED"


class OutOfRange(DomainError):
    code = "OUT_OF_RANGE"


class ResourceExhausted(DomainError):
    """A limit is reached; `retry_after` (seconds) says when trying again may work."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"


class Unavailable(DomainError):
    """The server cannot serve the call now (it is shutting down, say); the
    client should try again, after `retry_after` seconds, maybe elsewhere."""

    code = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after


def require(violations: list[FieldViolation]) -> None:
    """Raise InvalidArgument if any violation was collected."""
    if violations:
        raise InvalidArgument(violations)
