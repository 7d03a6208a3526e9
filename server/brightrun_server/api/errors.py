"""Domain errors → gRPC statuses with `google.rpc` details (AIP-193).

Every error status carries one `ErrorInfo{reason, domain, metadata}`; invalid
arguments add a `BadRequest` with one field violation per bad field; retryable
conditions add `RetryInfo`.

The status travels in trailers, which clients refuse above 8 KiB (grpcio's
default soft limit): a client would see RESOURCE_EXHAUSTED and none of the
details. Messages, field paths, descriptions and metadata often quote the
caller's input (a 70 kB filter, an id), so each is clipped to a bounded size.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from brightrun_server.domain.errors import DomainError, InvalidArgument

DOMAIN = "brightrun.dev"

#: UTF-8 bytes kept of the message, of each field path, violation description
#: and metadata value; violations and metadata entries kept. Together (base64
#: and percent-encoding included) well under the 8 KiB trailer limit.
MAX_MESSAGE = 400
MAX_FIELD = 100
MAX_DESCRIPTION = 160
MAX_VIOLATIONS = 8
MAX_METADATA_VALUE = 120
MAX_METADATA = 10


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary), marked with an ellipsis."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def to_status(error: DomainError, *, retry_after: float | None = None) -> grpc.Status:
    code = grpc.StatusCode[error.code]
    metadata = {clip(k, MAX_FIELD): clip(v, MAX_METADATA_VALUE) for k, v in list(error.metadata.items())[:MAX_METADATA]}
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))]
    if isinstance(error, InvalidArgument):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(
                field=clip(v.field, MAX_FIELD), description=clip(v.description, MAX_DESCRIPTION)
            )
            for v in error.violations[:MAX_VIOLATIONS]
        ]
        if len(error.violations) > MAX_VIOLATIONS:
            violations[-1].description = clip(
                f"{violations[-1].description} (and {len(error.violations) - MAX_VIOLATIONS} more violations)",
                MAX_DESCRIPTION,
            )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if retry_after is not None:
        seconds = int(retry_after)
        delay = duration_pb2.Duration(seconds=seconds, nanos=int((retry_after - seconds) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    message = clip(error.message, MAX_MESSAGE)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))


def internal_status(request_id: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata={"request_id": request_id})
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"internal error; quote request id {request_id} when reporting it",
            details=[_pack(info)],
        )
    )


def unavailable_status(message: str, reason: str, retry_after: float) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)
    seconds = int(retry_after)
    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((retry_after - seconds) * 1e9))
    )
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[_pack(info), _pack(retry)])
    )


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed
