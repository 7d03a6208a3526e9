"""Hypothesis strategies for any protobuf message, built by walking its descriptor.

`messages(descriptor, hints)` draws a message of that type: every field may be
absent or set; scalars lean on edge values (empty, huge, negative, NaN and
infinities, NUL and odd unicode, very long text); enums include numbers the
schema does not define; repeated fields, maps and nested messages are filled
recursively; at most one member of each oneof is set. Timestamp, Duration and
Struct get their own strategies, out-of-range values included.

`hints` maps a field name to a strategy of plausible values (real resource ids,
filter expressions, model names); a hinted field draws from its hint half the
time, so fuzzing reaches past NOT_FOUND and the first validation check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor
Hints = Mapping[str, st.SearchStrategy[Any]]

# ---------------------------------------------------------------- scalars

ODD_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x00" * 8,
    "\t\n\r",
    "\u202e\u202d",  # bidi overrides
    "\ufeff",  # BOM
    "\uffff\ufffe",  # noncharacters
    "\U0010ffff",
    "🙂🧪👩‍👩‍👧",
    "e\u0301" * 5,  # combining marks
    "ß" * 3,
    "İ",  # upper-cases to two code points
    "../../etc/passwd",
    "%s%n{0}",
    "'; DROP TABLE jobs; --",
    '"',
    "\\",
    "null",
    "-1",
    "9" * 40,
    "NaN",
]

#: Long enough to cross page, buffer and column limits, short enough that a
#: request with a few of them stays under gRPC's 4 MiB message limit.
LONG_TEXT = ["x" * 257, "y" * 2001, "z" * 70_000, "\x00" * 5000, "é" * 40_000]


def text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(ODD_TEXT),
        st.text(max_size=24),
        st.text(alphabet=st.characters(codec="ascii"), max_size=12),
        st.sampled_from(LONG_TEXT),
    )


def binary() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\xff" * 300, b"{" * 1000]))


def integers(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted({v for v in (0, 1, 2, -1, -2, 7, 100, 1000, 10**6, 2**31 - 1, 2**31, low, high) if low <= v <= high})
    return st.one_of(
        st.sampled_from(edges), st.integers(-3, 1000).filter(lambda v: low <= v <= high), st.integers(low, high)
    )


def floats(width: int) -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-12, float("nan"), float("inf"), float("-inf")]
    if width == 64:
        edges += [1e308, -1e308, 5e-324]
    return st.one_of(st.sampled_from(edges), st.floats(width=width))


_INT_KINDS: dict[int, tuple[int, bool]] = {
    F.TYPE_INT32: (32, True),
    F.TYPE_SINT32: (32, True),
    F.TYPE_SFIXED32: (32, True),
    F.TYPE_INT64: (64, True),
    F.TYPE_SINT64: (64, True),
    F.TYPE_SFIXED64: (64, True),
    F.TYPE_UINT32: (32, False),
    F.TYPE_FIXED32: (32, False),
    F.TYPE_UINT64: (64, False),
    F.TYPE_FIXED64: (64, False),
}


def enum_numbers(field: FieldDescriptor) -> st.SearchStrategy[int]:
    """Defined numbers most of the time, and numbers the schema does not know."""
    assert field.enum_type is not None
    known = [v.number for v in field.enum_type.values]
    return st.one_of(
        st.sampled_from(known),
        st.sampled_from(known),
        st.sampled_from([-1, max(known) + 1, 999, 2**31 - 1, -(2**31)]),
    )


# ---------------------------------------------------------------- well-known types

#: Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
TS_MIN, TS_MAX = -62_135_596_800, 253_402_300_799
#: Duration's valid range: +-10,000 years.
DUR_MAX = 315_576_000_000


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    seconds = st.one_of(
        st.integers(0, 4_102_444_800),  # 1970..2100
        st.sampled_from([TS_MIN, TS_MAX, TS_MIN - 1, TS_MAX + 1, -1, 2**63 - 1, -(2**63), 2**40]),
        st.integers(-(2**63), 2**63 - 1),
    )
    nanos = st.one_of(st.just(0), st.integers(0, 999_999_999), st.sampled_from([-1, 10**9, 2**31 - 1, -(2**31)]))
    return st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)


def durations() -> st.SearchStrategy[duration_pb2.Duration]:
    seconds = st.one_of(
        st.integers(-10, 10**6),
        st.sampled_from([0, 59, 60, 604_800, 604_801, DUR_MAX, -DUR_MAX, DUR_MAX + 1, 2**63 - 1, -(2**63)]),
        st.integers(-(2**63), 2**63 - 1),
    )
    nanos = st.one_of(st.just(0), st.integers(-999_999_999, 999_999_999), st.sampled_from([10**9, -(10**9), 2**31 - 1]))
    return st.builds(duration_pb2.Duration, seconds=seconds, nanos=nanos)


_JSON_SCALARS = st.one_of(st.none(), st.booleans(), floats(64), text())
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=12,
)


def structs() -> st.SearchStrategy[struct_pb2.Struct]:
    def build(value: dict[str, Any]) -> struct_pb2.Struct:
        out = struct_pb2.Struct()
        out.update(value)
        return out

    return st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(ODD_TEXT)), _JSON, max_size=5).map(build)


WELL_KNOWN: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "google.protobuf.Timestamp": timestamps,
    "google.protobuf.Duration": durations,
    "google.protobuf.Struct": structs,
}

# ---------------------------------------------------------------- messages


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def scalar(field: FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy[Any]:
    """A strategy for one (non-repeated) value of `field`."""
    if field.type == F.TYPE_MESSAGE:
        return messages(field.message_type, hints, depth + 1)
    if field.type == F.TYPE_ENUM:
        base: st.SearchStrategy[Any] = enum_numbers(field)
    elif field.type == F.TYPE_STRING:
        base = text()
    elif field.type == F.TYPE_BYTES:
        base = binary()
    elif field.type == F.TYPE_BOOL:
        base = st.booleans()
    elif field.type == F.TYPE_DOUBLE:
        base = floats(64)
    elif field.type == F.TYPE_FLOAT:
        base = floats(32)
    else:
        bits, signed = _INT_KINDS[field.type]
        base = integers(bits, signed)
    hint = hints.get(field.name) if field.type == F.TYPE_STRING else None  # hints are strings
    return st.one_of(hint, base) if hint is not None else base


def messages(descriptor: Descriptor, hints: Hints | None = None, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor`'s type, each field present or not."""
    hints = hints or {}
    if descriptor.full_name in WELL_KNOWN:
        return WELL_KNOWN[descriptor.full_name]()
    cls = _message_class(descriptor)
    if depth > 4:
        return st.builds(cls)

    @st.composite
    def draw_message(draw: st.DrawFn) -> Message:
        message = cls()
        chosen: dict[str, str] = {}
        for oneof in descriptor.oneofs:
            if _synthetic(oneof):
                continue
            names = [f.name for f in oneof.fields]
            pick = draw(st.sampled_from([None, *names]))
            if pick is not None:
                chosen[oneof.name] = pick
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and not _synthetic(oneof):
                if chosen.get(oneof.name) != field.name:
                    continue
            elif not draw(st.booleans()):
                continue
            _set(draw, message, field, hints, depth)
        return message

    return draw_message()


def _set(draw: st.DrawFn, message: Any, field: FieldDescriptor, hints: Hints, depth: int) -> None:
    if _is_map(field):
        entry = field.message_type
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        hint = hints.get(f"{field.name}.key")
        keys = st.one_of(hint, scalar(key_field, {}, depth)) if hint is not None else scalar(key_field, {}, depth)
        values = scalar(value_field, hints, depth)
        items = draw(st.dictionaries(keys, values, max_size=5))
        target = getattr(message, field.name)
        for k, v in items.items():
            if value_field.type == F.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
        return
    if _is_repeated(field):
        values = draw(st.lists(scalar(field, hints, depth), max_size=5))
        target = getattr(message, field.name)
        if field.type == F.TYPE_MESSAGE:
            for v in values:
                target.add().CopyFrom(v)
        else:
            target.extend(values)
        return
    value = draw(scalar(field, hints, depth))
    if field.type == F.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _synthetic(oneof: Any) -> bool:
    """A proto3 `optional` field's oneof: the field is set independently."""
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


def _message_class(descriptor: Descriptor) -> Any:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


# ---------------------------------------------------------------- field paths


def names_field(descriptor: Descriptor, path: str) -> bool:
    """True if `path` (``compute.gpu_type``, ``labels.team``, ``reports[2].sequence``)
    names a field of `descriptor`: each segment a field of the message before
    it; a map field's next segment is any key."""
    if not path:
        return False
    current: Descriptor | None = descriptor
    segments = path.split(".")
    i = 0
    while i < len(segments):
        segment = segments[i].split("[", 1)[0]
        if current is None or segment not in current.fields_by_name:
            return False
        field = current.fields_by_name[segment]
        if _is_map(field) or (field.message_type and field.message_type.full_name == "google.protobuf.Struct"):
            return True  # what follows is a key, and keys may be anything
        current = field.message_type
        i += 1
    return True
