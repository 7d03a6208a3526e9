"""JSON primitives: a fast parser with a strict fallback, a path locator, error text.

``fast_loads`` uses orjson when it is installed (about twice as fast as the
standard library here) and ``json`` otherwise. Both are used the same way: the
fast parser only ever decides "this record is fine"; when it refuses a record,
the standard library re-parses it to say what is wrong and where, so reports are
identical with and without orjson. The standard library is made as strict as
orjson: it rejects ``NaN`` / ``Infinity`` and invalid UTF-8.
"""

from __future__ import annotations

import importlib
import json
import json.decoder
import re
from collections.abc import Callable, Sequence
from json.scanner import make_scanner
from typing import Any

#: ``scanstring(text, end) -> (value, end)``: the C string scanner, end after the quote.
scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]

_ORJSON_LOADS: Callable[[bytes | bytearray], Any] | None
try:  # orjson is optional: about twice as fast as json on dataset lines
    _ORJSON_LOADS = importlib.import_module("orjson").loads
except ImportError:  # pragma: no cover - depends on the environment
    _ORJSON_LOADS = None


class JSONConstantError(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity``: accepted by Python, not JSON."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _reject_constant(name: str) -> Any:
    raise JSONConstantError(name)


_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
#: ``raw_decode(text, index) -> (value, end)``; strict like :func:`strict_loads`.
raw_decode = _STRICT_DECODER.raw_decode
_scan_once = make_scanner(_STRICT_DECODER)  # type: ignore[arg-type]
_stdlib_loads = _STRICT_DECODER.decode


def strict_loads(text: str) -> Any:
    """Parse one JSON text with the standard library, rejecting NaN / Infinity."""
    return _stdlib_loads(text)


def _stdlib_fast_loads(raw: bytes | bytearray) -> Any:
    return _stdlib_loads(raw.decode("utf-8"))


_fast_loads: Callable[[bytes | bytearray], Any] = _ORJSON_LOADS or _stdlib_fast_loads


def fast_loads(raw: bytes | bytearray) -> Any:
    """Parse a UTF-8 JSON text; raise on anything the strict parser would refuse."""
    return _fast_loads(raw)


def backend() -> str:
    """``"orjson"`` or ``"json"``: which parser :func:`fast_loads` uses."""
    return "orjson" if _fast_loads is _ORJSON_LOADS else "json"


def set_backend(name: str) -> str:
    """Choose the fast parser (``"orjson"`` or ``"json"``); return the previous one.

    For tests and benchmarks. Raises ``ValueError`` for orjson when it is not
    installed.
    """
    global _fast_loads
    previous = backend()
    if name == "json":
        _fast_loads = _stdlib_fast_loads
    elif name == "orjson":
        if _ORJSON_LOADS is None:
            raise ValueError("orjson is not installed")
        _fast_loads = _ORJSON_LOADS
    else:
        raise ValueError(f"unknown JSON backend {name!r}")
    return previous


def orjson_available() -> bool:
    return _ORJSON_LOADS is not None


# ---------------------------------------------------------------------------
# Locating a path inside a JSON text.

_WS = re.compile(r"[ \t\n\r]*")
_ws_end = _WS.match


def skip_ws(text: str, pos: int) -> int:
    m = _ws_end(text, pos)
    return m.end() if m else pos


def locate(text: str, start: int, path: Sequence[str | int], end: int | None = None) -> tuple[int, bool]:
    """Find where the value at ``path`` starts in the JSON value at ``text[start:]``.

    Returns ``(position, found)``. When the path does not exist (a missing key,
    an index past the end, a value of another type) the position is that of the
    deepest container on the path that does exist, and ``found`` is False. A key
    that appears more than once resolves to its last occurrence, the one parsers
    keep. Never raises; on text that does not parse it returns the best position
    it reached.
    """
    limit = len(text) if end is None else end
    pos = skip_ws(text, start)
    try:
        for comp in path:
            if pos >= limit:
                return pos, False
            container = pos
            if isinstance(comp, str):
                if text[pos] != "{":
                    return container, False
                pos = skip_ws(text, pos + 1)
                hit = -1
                while pos < limit and text[pos] == '"':
                    key, pos = scanstring(text, pos + 1)
                    pos = skip_ws(text, pos)
                    if text[pos] != ":":
                        break
                    pos = skip_ws(text, pos + 1)
                    if key == comp:
                        hit = pos
                    _, pos = _scan_once(text, pos)
                    pos = skip_ws(text, pos)
                    if pos < limit and text[pos] == ",":
                        pos = skip_ws(text, pos + 1)
                    else:
                        break
                if hit < 0:
                    return container, False
                pos = hit
            else:
                if text[pos] != "[":
                    return container, False
                pos = skip_ws(text, pos + 1)
                for _ in range(comp):
                    if pos >= limit or text[pos] == "]":
                        return container, False
                    _, pos = _scan_once(text, pos)
                    pos = skip_ws(text, pos)
                    if pos >= limit or text[pos] != ",":
                        return container, False
                    pos = skip_ws(text, pos + 1)
                if pos >= limit or text[pos] == "]":
                    return container, False
        return pos, True
    except (StopIteration, ValueError, IndexError, RecursionError):
        return min(pos, limit), False


# ---------------------------------------------------------------------------
# Describing values and parser errors for people.


def json_type(value: object) -> str:
    """The JSON name of a Python value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(value: object) -> str:
    """Short description of a value for ``found``: ``null``, ``number 3``, ``"tool"``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return json.dumps(clip(value), ensure_ascii=False)
    if isinstance(value, list):
        return f"array of {len(value)}"
    if isinstance(value, dict):
        keys = ", ".join(clip(str(k), 24) for k in list(value)[:5])
        more = ", …" if len(value) > 5 else ""
        return f"object {{{keys}{more}}}" if value else "empty object"
    return type(value).__name__


def malformed_fix(msg: str, text: str, pos: int, *, jsonl: bool) -> str:
    """A concrete fix for a ``json.JSONDecodeError`` message at ``text[pos]``."""
    before = text[:pos].rstrip()
    if msg.startswith("Expecting property name") or (msg.startswith("Expecting value") and before.endswith(",")):
        if before.endswith(","):
            return "Remove the trailing comma before the closing bracket."
        if pos < len(text) and text[pos] == "'":
            return "Use double quotes for keys and strings; single quotes are not JSON."
        return 'Put keys in double quotes: {"key": value}.'
    if msg.startswith("Unterminated string"):
        return "Close the string with a double quote; write line breaks inside strings as \\n."
    if msg.startswith("Invalid control character"):
        return "Escape control characters inside strings: newline as \\n, tab as \\t."
    if msg.startswith("Invalid \\escape") or msg.startswith("Invalid \\u"):
        return "Escape backslashes inside strings as \\\\."
    if msg.startswith("Extra data"):
        if jsonl:
            return "Write exactly one JSON object per line; split this line."
        return "Remove the text after the end of the JSON document."
    if msg.startswith("Expecting ',' delimiter"):
        return "Add the missing comma between the elements, or close the open string or bracket."
    if msg.startswith("Expecting ':' delimiter"):
        return 'Separate each key from its value with a colon: "key": value.'
    if msg.startswith("Expecting value"):
        if pos < len(text) and text[pos] == "'":
            return "Use double quotes for strings; single quotes are not JSON."
        if pos >= len(text.rstrip()):
            return (
                "The text ends too early: complete the record."
                if jsonl
                else "The file ends too early: it is truncated or a bracket is missing."
            )
        return "Write a JSON value here (string in double quotes, number, object, array)."
    return "Fix the JSON syntax at the marked position."
