"""Rules shared by every request: idempotency keys."""

from __future__ import annotations

import re

from brightrun_server.domain.errors import FieldViolation

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def check_request_id(value: str, field: str = "request_id") -> FieldViolation | None:
    """None if `value` is empty (no idempotency wanted) or a valid key."""
    if value and not _REQUEST_ID.match(value):
        return FieldViolation(field, "must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    return None
