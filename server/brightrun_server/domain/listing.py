"""List filters (a subset of AIP-160) and opaque keyset page tokens (AIP-158).

Filter grammar: ``term (AND term)*`` where ``term := field op value``,
``op`` is one of ``= != < <= > >=``, and ``value`` is a double-quoted string
(backslash escapes), a bare word (letters, digits, ``_ - . : +``) or a number.
Field names are dotted words (``labels.team``). Keywords are case-insensitive.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from brightrun_server.domain.errors import FieldViolation, InvalidArgument

OPERATORS = ("<=", ">=", "!=", "=", "<", ">")

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<op><=|>=|!=|=|<|>)
      | (?P<word>[A-Za-z0-9_.:+\-]+)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Comparison:
    field: str
    op: str
    value: Any


def _invalid(message: str, position: int, field: str = "filter") -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation(field, f"{message} (at character {position})")],
        reason="FILTER_INVALID",
        metadata={"position": str(position)},
    )


def parse_filter(
    text: str,
    fields: Mapping[str, Callable[[str], Any]],
    *,
    prefix_fields: Mapping[str, Callable[[str], Any]] | None = None,
) -> list[Comparison]:
    """Parse `text` into comparisons; `fields` maps each allowed field to a
    converter for its value (raising ValueError with the allowed values on bad
    input). `prefix_fields` allows families such as ``labels.KEY``."""
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            raise _invalid(f"unexpected character {text[pos:].lstrip()[:1]!r}", pos)
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind), match.start(kind)))
        pos = match.end()
    comparisons: list[Comparison] = []
    i = 0
    while i < len(tokens):
        if comparisons:
            kind, value, at = tokens[i]
            if kind != "word" or value.upper() != "AND":
                raise _invalid(f"expected AND, found {value!r}", at)
            i += 1
        if i < len(tokens) and tokens[i][0] != "word":
            raise _invalid(f"expected a field name, found {tokens[i][1]!r}", tokens[i][2])
        if i + 1 < len(tokens) and tokens[i + 1][0] != "op":
            raise _invalid(
                f"expected an operator ({' '.join(OPERATORS)}), found {tokens[i + 1][1]!r}", tokens[i + 1][2]
            )
        if i + 2 < len(tokens) and tokens[i + 2][0] == "op":
            raise _invalid(f"expected a value, found {tokens[i + 2][1]!r}", tokens[i + 2][2])
        if len(tokens) - i < 3:
            at = tokens[i][2] if i < len(tokens) else len(text)
            raise _invalid("incomplete comparison; expected FIELD OP VALUE", at)
        (_, fname, fat), (_, op, _), (vk, raw, vat) = tokens[i : i + 3]
        value_text = json.loads(raw) if vk == "string" else raw
        converter = fields.get(fname)
        if converter is None and prefix_fields:
            for family, conv in prefix_fields.items():
                if fname.startswith(family + ".") and len(fname) > len(family) + 1:
                    converter = conv
                    break
        if converter is None:
            allowed = sorted(fields) + [f"{p}.KEY" for p in (prefix_fields or {})]
            raise _invalid(f"unknown field {fname!r}; filterable fields: {', '.join(allowed)}", fat)
        try:
            converted = converter(value_text)
        except ValueError as e:
            raise _invalid(f"bad value for {fname}: {e}", vat) from e
        comparisons.append(Comparison(fname, op, converted))
        i += 3
    return comparisons


def encode_page_token(key: list[Any], query: str) -> str:
    """An opaque token holding the last row's sort key and the query it belongs to."""
    body = json.dumps({"k": key, "q": _query_hash(query)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


#: What one element of a page token's key must be: an aware ISO 8601 time, a
#: string without NUL, a 64-bit integer, a finite number.
KeyKind = Literal["time", "str", "int", "float"]


def decode_page_token(token: str, query: str, kinds: Sequence[KeyKind] | None = None) -> list[Any] | None:
    """The sort key of a page token, None for the first page.

    A token is opaque but not signed, so a caller can forge one for the right
    query; `kinds` says what each element of the key must be, and a key of
    another shape is PAGE_TOKEN_INVALID rather than an error in the query."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
        key = body["k"]
        same_query = body["q"] == _query_hash(query)
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(
            [FieldViolation("page_token", "is not a token this server issued")],
            reason="PAGE_TOKEN_INVALID",
        ) from e
    if not same_query or not isinstance(key, list):
        raise InvalidArgument(
            [FieldViolation("page_token", "belongs to a different filter or list; start again without it")],
            reason="PAGE_TOKEN_INVALID",
        )
    if kinds is not None and (len(key) != len(kinds) or not all(map(_is_kind, key, kinds))):
        raise InvalidArgument(
            [FieldViolation("page_token", "is not a token this server issued")],
            reason="PAGE_TOKEN_INVALID",
        )
    return key


def _is_kind(value: Any, kind: KeyKind) -> bool:
    if kind == "int":
        return type(value) is int and -(2**63) <= value < 2**63
    if kind == "float":
        return type(value) in (int, float) and math.isfinite(value)
    if not isinstance(value, str) or "\x00" in value:
        return False
    if kind == "time":
        try:
            return datetime.fromisoformat(value).tzinfo is not None
        except ValueError:
            return False
    return True


def _query_hash(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def page_size(requested: int, *, default: int, maximum: int, field: str = "page_size") -> int:
    if requested < 0:
        raise InvalidArgument([FieldViolation(field, f"must be between 0 and {maximum}, got {requested}")])
    return min(requested or default, maximum)
