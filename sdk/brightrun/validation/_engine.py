"""The streaming validation engine behind ``validate_file`` and ``iter_examples``.

One pass over the file, memory bounded by the largest record:

* JSON Lines (all three formats): read line by line (``readline`` with a size
  limit), parse each line with the fast parser, check it, forget it. A line that
  the fast parser refuses is re-examined by the slow path, which names the
  encoding or syntax problem and its position; the next line is independent, so
  every broken line is reported.
* Conversations as one JSON document (``{"conversations": [...]}``, a top-level
  array, or conversation objects one after another): a sliding text window over
  the file (8 MB reads, decoded incrementally); ``json.JSONDecoder.raw_decode``
  parses one conversation at a time, so a 1 GB document needs memory for one
  conversation plus the window, never the document. After a syntax error the
  reader resynchronises at the next object that parses as a conversation
  (``training_pairs`` or ``conversation_id``), so later conversations are still
  checked.

Duplicates are found with 64-bit hashes in an open-addressing table of two
``array('Q')`` (16 bytes a slot, load at most 0.7), never by keeping content. Two
different examples collide with probability about n²/2⁶⁵ (3·10⁻⁸ for a million
examples).
"""

from __future__ import annotations

import codecs
import math
import os
import re
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from json import JSONDecodeError
from operator import itemgetter
from typing import IO, Any

from brightrun.validation import _json
from brightrun.validation._json import JSONConstantError, clip, describe, json_type
from brightrun.validation.formats import DatasetFormat, DatasetFormatError, Example, Message
from brightrun.validation.issues import IssueType, Severity, ValidationIssue

ROLES = ("system", "user", "assistant")
_ROLE_SET = frozenset(ROLES)
_MISSING: Any = object()
_BAD: Any = object()
_UNPARSED: Any = object()
_M64 = 0xFFFF_FFFF_FFFF_FFFF

#: Largest line / conversation the engine accepts (bytes).
MAX_RECORD_BYTES = 64 << 20
#: Bytes read per step by the document reader.
CHUNK_BYTES = 4 << 20
#: Validation stops after this many invalid byte sequences: the file is not text.
MAX_ENCODING_ERRORS = 10_000
#: Distinct values kept per scaffolding field; the rest count under "(other)".
MAX_DISTINCT_VALUES = 1000
#: Quality ratings are on the seeds' 0-5 scale.
RATING_MAX = 5.0

_CRIT = Severity.CRITICAL.value
_WARN = Severity.WARNING.value
# Escapes worth a look: \u0000 and surrogates. A valid pair matches the first,
# 12-character alternative, so only an unpaired surrogate or \u0000 matches otherwise.
_ESCAPES = re.compile(
    rb"\\u(?:[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|0000|[dD][89a-fA-F][0-9a-fA-F]{2})"
)
_ESCAPES_TEXT = re.compile(_ESCAPES.pattern.decode("ascii"))


def _suspect(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether ``data[start:end]`` holds a ``\\u0000`` or an unpaired surrogate escape
    (or a literal backslash that looks like one: a false alarm only costs time)."""
    stop = len(data) if end is None else end
    if data.find(b"\\", start, stop) < 0:
        return False
    return any(m.end() - m.start() != 12 for m in _ESCAPES.finditer(data, start, stop))


def _suspect_text(text: str, start: int, end: int) -> bool:
    """:func:`_suspect` for the document reader's text."""
    if text.find("\\", start, end) < 0:
        return False
    return any(m.end() - m.start() != 12 for m in _ESCAPES_TEXT.finditer(text, start, end))


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_NOT_ESCAPED = re.compile("[\ud800-\udc7f\udd00-\udfff]")
_SCAFFOLD_FIELDS = ("persona", "emotional_arc", "topic")
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))
_DOC_META_KEYS = ("dataset_metadata", "metadata")


class _Abort(Exception):
    """Stop validating: the file is not text."""


class _Malformed(Exception):
    def __init__(self, pos: int, msg: str) -> None:
        super().__init__(msg)
        self.pos = pos
        self.msg = msg


class _TooLarge(Exception):
    pass


# ---------------------------------------------------------------------------
# Compact hash set with a value per key.


class HashIndex:
    """Open-addressing table of 64-bit keys (never 0) to 64-bit values."""

    __slots__ = ("_keys", "_limit", "_mask", "_n", "_vals")

    def __init__(self, capacity: int = 1 << 12) -> None:
        size = 1
        while size < capacity:
            size <<= 1
        self._keys = array("Q", [0]) * size
        self._vals = array("Q", [0]) * size
        self._mask = size - 1
        self._n = 0
        self._limit = int(size * 0.7)

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return 16 * (self._mask + 1)

    def add(self, key: int, value: int) -> int:
        """Insert ``key``; return -1 if it is new, else the value stored first."""
        keys = self._keys
        mask = self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == 0:
                keys[i] = key
                self._vals[i] = value
                self._n += 1
                if self._n > self._limit:
                    self._grow()
                return -1
            if k == key:
                return self._vals[i]
            i = (i + 1) & mask

    def _grow(self) -> None:
        old_keys, old_vals = self._keys, self._vals
        size = (self._mask + 1) * 2
        keys = array("Q", [0]) * size
        vals = array("Q", [0]) * size
        mask = size - 1
        for k, v in zip(old_keys, old_vals, strict=True):
            if k:
                i = k & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = k
                vals[i] = v
        self._keys, self._vals, self._mask = keys, vals, mask
        self._limit = int(size * 0.7)


def _key64(obj: object) -> int:
    return (hash(obj) & _M64) or 1


# ---------------------------------------------------------------------------
# Statistics gathered during the pass.


class LengthStats:
    """Count, min, max, mean and approximate percentiles of lengths, in O(1) memory.

    Lengths fall in buckets of 1/8 octave (each bucket's upper bound is at most
    12.5 % above its lower bound); percentiles report the bucket's upper bound,
    capped at the maximum seen.
    """

    __slots__ = ("buckets", "count", "max", "min", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0
        self.buckets: Counter[int] = Counter()

    def add(self, n: int) -> None:
        if self.count == 0 or n < self.min:
            self.min = n
        if n > self.max:
            self.max = n
        self.count += 1
        self.total += n
        self.buckets[_bucket(n)] += 1

    def add_many(self, values: array[int]) -> None:
        """Add many lengths at once (C-level counting; cheaper than :meth:`add`)."""
        if not values:
            return
        low, high = min(values), max(values)
        if self.count == 0 or low < self.min:
            self.min = low
        self.max = max(self.max, high)
        self.count += len(values)
        self.total += sum(values)
        buckets = self.buckets
        for n, c in Counter(values).items():
            buckets[_bucket(n)] += c

    def percentile(self, q: float) -> int:
        if not self.count:
            return 0
        rank = q * self.count
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= rank:
                return min(_bucket_high(b), self.max)
        return self.max

    def histogram(self, edges: tuple[int, ...]) -> list[tuple[int, int | None, int]]:
        """Counts in ``[edges[k], edges[k+1])`` (the last bin is open), from buckets.

        Buckets straddling an edge are attributed to the bin of their lower bound;
        with power-of-two edges (the default) no bucket straddles.
        """
        counts = [0] * len(edges)
        for b, c in self.buckets.items():
            low = _bucket_low(b)
            k = 0
            while k + 1 < len(edges) and low >= edges[k + 1]:
                k += 1
            counts[k] += c
        return [(edges[k], edges[k + 1] if k + 1 < len(edges) else None, counts[k]) for k in range(len(edges))]


def _bucket(n: int) -> int:
    if n < 16:
        return n
    e = n.bit_length() - 4
    return (e << 4) | (n >> e)  # top 4 bits of n, and its exponent


def _bucket_low(b: int) -> int:
    if b < 16:
        return b
    e, top = b >> 4, b & 15
    return top << e


def _bucket_high(b: int) -> int:
    if b < 16:
        return b
    e, top = b >> 4, b & 15
    return ((top + 1) << e) - 1


@dataclass(slots=True)
class TokenTotals:
    """Token counts gathered when a tokenizer is available."""

    max_seq_len: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    over_max: int = 0
    tokens_over_max: int = 0
    max_overflow: int = 0
    targets_truncated: int = 0
    template_errors: int = 0
    lengths: LengthStats = field(default_factory=LengthStats)


@dataclass(slots=True)
class EngineResult:
    """What one pass learned, before scoring."""

    format: DatasetFormat
    issues: list[ValidationIssue]
    counts: Counter[str]
    critical: int
    warning: int
    dropped: Counter[str]
    critical_by_type: Counter[str]
    records: int = 0
    records_with_errors: int = 0
    examples: int = 0
    messages: int = 0
    content_chars: int = 0
    char_lengths: LengthStats = field(default_factory=LengthStats)
    scaffolding: dict[str, Counter[str]] = field(default_factory=dict)
    combinations: Counter[str] = field(default_factory=Counter)
    pairs_with_metadata: int = 0
    rating_sum: float = 0.0
    rating_count: int = 0
    dataset_rating: float | None = None
    format_version: str | None = None
    tokens: TokenTotals | None = None
    aborted: str | None = None
    size_bytes: int = 0
    duplicate_index_bytes: int = 0


# ---------------------------------------------------------------------------
# Tokenizer-aware checks, run per valid example.


class TokenCheck:
    """Counts tokens of each valid example and reports length / label problems."""

    def __init__(self, encoder: Any, max_seq_len: int) -> None:
        from brightrun.validation.chat import ChatEncoder

        self.encoder: ChatEncoder = encoder
        self.max_seq_len = max_seq_len
        self.totals = TokenTotals(max_seq_len=max_seq_len)


# ---------------------------------------------------------------------------
# The engine.


class _Block:
    """Whole lines of a JSON Lines file read at once; line offsets computed lazily."""

    __slots__ = ("_lines", "_starts", "cut", "data", "first_line", "offset")

    def __init__(self, data: bytes, cut: int, first_line: int, offset: int) -> None:
        self.data = data  # the lines are data[:cut]; the rest belongs to the next block
        self.cut = cut
        self.first_line = first_line
        self.offset = offset
        self._lines: list[bytes] | None = None
        self._starts: list[int] | None = None

    def lines(self) -> list[bytes]:
        """The lines, without their line breaks."""
        if self._lines is None:
            self._lines = self.data[: self.cut].split(b"\n")[:-1]
        return self._lines

    def ref(self, k: int) -> Ref:
        lines = self.lines()
        if self._starts is None:
            starts = [0]
            for line in lines:
                starts.append(starts[-1] + len(line) + 1)
            self._starts = starts
        return (lines[k], 0, self.first_line + k, self.offset + self._starts[k], 0)


# A record reference: (text, start, line, byte, col0). ``text`` is the raw line
# (bytes) for JSON Lines or the reader's window (str) for documents; the record
# starts at ``text[start]``, on ``line`` (1-based), at byte ``byte`` of the file and
# 0-based column ``col0``. For documents ``byte`` is None: byte offsets are only
# computed for issues, by the reader (``Engine.byte_at``).
Ref = tuple[bytes | str, int, int, int | None, int]


class Engine:
    """Validates one file in one pass; see the module doc."""

    def __init__(
        self,
        fmt: DatasetFormat,
        *,
        max_issues_per_type: int | None = 1000,
        strict: bool = False,
        on_example: Callable[[Example], None] | None = None,
        token_check: TokenCheck | None = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self.fmt = fmt
        self.max_per_type = max_issues_per_type
        self.strict = strict
        self.on_example = on_example
        self.tokens = token_check
        self.need_messages = on_example is not None or token_check is not None
        self.max_record_bytes = max_record_bytes
        self.root = "conversations" if fmt is DatasetFormat.CONVERSATIONS else ""
        self.issues: list[ValidationIssue] = []
        self.counts: Counter[str] = Counter()
        self.critical_counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.n_critical = 0
        self.n_warning = 0
        self.seq = 0
        self.content_index = HashIndex()
        self.id_index = HashIndex(16)
        self.res = EngineResult(
            format=fmt,
            issues=self.issues,
            counts=self.counts,
            critical=0,
            warning=0,
            dropped=self.dropped,
            critical_by_type=self.critical_counts,
        )
        self.lengths: array[int] = array("Q")
        self.n_messages = 0
        self.scaffolding: dict[str, Counter[str]] = {k: Counter() for k in _SCAFFOLD_FIELDS}
        self.res.scaffolding = self.scaffolding
        self.encoding_errors = 0
        #: Byte offset of a position in the document reader's window (set by it).
        self.byte_at: Callable[[int], int] | None = None

    # -- issues ------------------------------------------------------------

    def emit(
        self,
        itype: IssueType,
        severity: str,
        message: str,
        ref: Ref | None,
        comps: tuple[str | int, ...] = (),
        *,
        index: int | None = None,
        conv_id: str | None = None,
        pair: int | None = None,
        pos: int | None = None,
        expected: str | None = None,
        found: str | None = None,
        fix: str | None = None,
        where: tuple[int, int, int] | None = None,
    ) -> None:
        """Count an issue and store it (located) unless its type reached the cap.

        The location is ``where`` (line, column, byte) when given, else ``pos`` (a
        character position in the record's text), else the position of ``comps``
        inside the record (or of the deepest container that exists).
        """
        t = itype.value
        self.counts[t] += 1
        if severity == _CRIT:
            self.n_critical += 1
            self.critical_counts[t] += 1
        else:
            self.n_warning += 1
            if self.strict:
                return
        if not self.strict and self.max_per_type is not None and self.counts[t] > self.max_per_type:
            self.dropped[t] += 1
            return
        path = self._path(index, comps)
        line = column = byte = None
        if where is not None:
            line, column, byte = where
        elif ref is not None:
            line, column, byte = _locate(ref, comps, pos, self.byte_at)
        if self.strict:
            raise DatasetFormatError(message, path=path, line=line)
        self.seq += 1
        self.issues.append(
            ValidationIssue(
                type=t,
                severity=severity,
                message=_printable(message),
                path=path,
                line=line,
                column=column,
                byte_offset=byte,
                conversation_index=index,
                conversation_id=None if conv_id is None else _printable(conv_id),
                pair_index=pair,
                expected=expected,
                found=None if found is None else _printable(found),
                suggested_fix=fix,
            )
        )

    def _path(self, index: int | None, comps: tuple[str | int, ...]) -> str:
        parts = [self.root] if index is not None and self.root else []
        if index is not None:
            parts.append(f"[{index}]")
        for c in comps:
            parts.append(f"[{c}]" if isinstance(c, int) else f".{c}")
        text = "".join(parts)
        return text[1:] if text.startswith(".") else text

    # -- field helpers -------------------------------------------------------

    def _require_str(
        self,
        obj: dict[str, Any],
        key: str,
        ref: Ref,
        comps: tuple[str | int, ...],
        index: int,
        conv_id: str | None,
        pair: int | None,
        *,
        what: str,
    ) -> str | None:
        """Return ``obj[key]`` if it is a string; report it missing / mistyped."""
        value = obj.get(key, _MISSING)
        if type(value) is str:
            return value
        here = (*comps, key)
        if value is _MISSING or value is None:
            self.emit(
                IssueType.MISSING_REQUIRED_FIELD,
                _CRIT,
                f"missing required field '{key}'" if value is _MISSING else f"required field '{key}' is null",
                ref,
                here,
                index=index,
                conv_id=conv_id,
                pair=pair,
                expected=f"{what} (string)",
                found="missing" if value is _MISSING else "null",
                fix=f"Add '{key}' with {what}.",
            )
        elif isinstance(value, str):  # a str subclass cannot come from JSON; be safe
            return str(value)
        else:
            fix = f"Write '{key}' as a JSON string."
            if isinstance(value, list) and key == "content":
                fix = "Join the content parts into one string; only text content is supported."
            self.emit(
                IssueType.INVALID_DATA_TYPE,
                _CRIT,
                f"'{key}' must be a string, found {json_type(value)}",
                ref,
                here,
                index=index,
                conv_id=conv_id,
                pair=pair,
                expected="string",
                found=describe(value),
                fix=fix,
            )
        return None

    def _empty(
        self,
        text: str,
        key: str,
        severity: str,
        ref: Ref,
        comps: tuple[str | int, ...],
        index: int,
        conv_id: str | None,
        pair: int | None,
        why: str,
    ) -> None:
        self.emit(
            IssueType.EMPTY_CONTENT,
            severity,
            f"'{key}' is empty" if not text else f"'{key}' is only whitespace",
            ref,
            comps,
            index=index,
            conv_id=conv_id,
            pair=pair,
            expected="non-empty text",
            found=describe(text),
            fix=why,
        )

    def _check_id(self, value: Any, ref: Ref, comps: tuple[str | int, ...], index: int, key: str) -> str | None:
        """Validate an id value; report duplicates; return it as text."""
        if isinstance(value, bool) or not isinstance(value, str | int):
            self.emit(
                IssueType.INVALID_DATA_TYPE,
                _WARN,
                f"'{key}' must be a string, found {json_type(value)}",
                ref,
                comps,
                index=index,
                expected="string",
                found=describe(value),
                fix=f"Write '{key}' as a unique string.",
            )
            return None
        cid = value if isinstance(value, str) else str(value)
        first = self.id_index.add(_key64(cid), index)
        if first >= 0:
            self.emit(
                IssueType.DUPLICATE_ID,
                _CRIT,
                f"{key} {clip(cid)!r} is already used by {self._path(first, ())}",
                ref,
                comps,
                index=index,
                conv_id=cid,
                expected="an id not used before",
                found=describe(cid),
                fix=f"Give this conversation its own id (the first use is {self._path(first, ())}),"
                " or remove it if it is a copy.",
            )
        return cid

    def _weight(self, obj: dict[str, Any], ref: Ref, index: int, conv_id: str | None) -> float:
        w = obj.get("weight")
        if w is None:
            return 1.0
        if isinstance(w, bool) or not isinstance(w, int | float):
            self.emit(
                IssueType.INVALID_DATA_TYPE,
                _WARN,
                f"'weight' must be a number, found {json_type(w)}; 1.0 is used",
                ref,
                ("weight",),
                index=index,
                conv_id=conv_id,
                expected="number >= 0",
                found=describe(w),
                fix="Write the weight as a number, or remove it.",
            )
            return 1.0
        wf = float(w)
        if not math.isfinite(wf) or wf < 0:
            self.emit(
                IssueType.INVALID_VALUE,
                _WARN,
                f"'weight' must be a finite number >= 0, found {w!r}; 1.0 is used",
                ref,
                ("weight",),
                index=index,
                conv_id=conv_id,
                expected="number >= 0",
                found=describe(w),
                fix="Use a weight of 0 or more (1.0 is the default).",
            )
            return 1.0
        return wf

    def _duplicate(
        self,
        key: object,
        ref: Ref,
        comps: tuple[str | int, ...],
        index: int,
        pair: int | None,
        conv_id: str | None,
    ) -> None:
        """Record the example's content hash; report it if an earlier example had it."""
        packed = (index << 20) | (0 if pair is None else min(pair, 0xFFFFF))
        first = self.content_index.add((hash(key) & _M64) or 1, packed)
        if first >= 0:
            self._report_duplicate(first, ref, comps, index, pair, conv_id)

    def _report_duplicate(
        self,
        first: int,
        ref: Ref,
        comps: tuple[str | int, ...],
        index: int,
        pair: int | None,
        conv_id: str | None,
    ) -> None:
        f_index, f_pair = first >> 20, first & 0xFFFFF
        where = self._path(f_index, () if pair is None else ("training_pairs", f_pair))
        self.emit(
            IssueType.DUPLICATE_CONTENT,
            _WARN,
            f"same content as {where}",
            ref,
            comps,
            index=index,
            conv_id=conv_id,
            pair=pair,
            expected="an example not seen before",
            found=f"a copy of {where}",
            fix=f"Remove this copy of {where}; duplicates over-weight one example in training.",
        )

    def _count_example(self, chars: int, messages: int) -> None:
        self.n_messages += messages
        lengths = self.lengths
        lengths.append(chars)
        if len(lengths) >= 1 << 16:
            self.flush_lengths()

    def flush_lengths(self) -> None:
        self.res.char_lengths.add_many(self.lengths)
        self.lengths = array("Q")

    # -- record checks: chat -------------------------------------------------

    def check_chat(self, obj: Any, index: int, ref: Ref, mark: int) -> None:
        if type(obj) is not dict:
            self._not_object(obj, index, ref, "an object with a 'messages' array")
            return
        msgs = obj.get("messages", _MISSING)
        conv_id = None
        if "id" in obj and obj["id"] is not None:
            conv_id = self._check_id(obj["id"], ref, ("id",), index, "id")
        if type(msgs) is list and msgs:
            # Fast path: every check below runs at C speed; any doubt goes the slow way.
            try:
                roles = [m["role"] for m in msgs]
                contents = [m["content"] for m in msgs]
                fast = roles[-1] == "assistant" and _ROLE_SET.issuperset(roles)
                chars = len("".join(contents))
            except (KeyError, TypeError):
                fast = False
            if fast and min(map(len, contents)) and not any(map(str.isspace, contents)):
                weight = self._weight(obj, ref, index, conv_id) if "weight" in obj else 1.0
                if self.n_critical != mark:
                    return
                first = self.content_index.add((hash((tuple(roles), tuple(contents))) & _M64) or 1, index << 20)
                if first >= 0:
                    self._report_duplicate(first, ref, (), index, None, conv_id)
                self.n_messages += len(msgs)
                lengths = self.lengths
                lengths.append(chars)
                if len(lengths) >= 1 << 16:
                    self.flush_lengths()
                if self.need_messages:
                    messages = tuple(map(Message, roles, contents))
                    example = Example(messages=messages, index=index, conversation_id=conv_id, weight=weight)
                    self._deliver(example, ref, (), index, None, conv_id)
                return
        if type(msgs) is not list:
            self._bad_container(msgs, "messages", "array of messages", index, conv_id, ref, ())
            return
        if not msgs:
            self._empty_array("messages", index, conv_id, ref, ("messages",), "Add the messages.")
            return
        roles = []
        contents = []
        has_assistant = False
        roles_ok = True
        chars = 0
        for j, m in enumerate(msgs):
            if type(m) is not dict:
                self.emit(
                    IssueType.INVALID_DATA_TYPE,
                    _CRIT,
                    f"message must be an object, found {json_type(m)}",
                    ref,
                    ("messages", j),
                    index=index,
                    conv_id=conv_id,
                    expected='object {"role", "content"}',
                    found=describe(m),
                    fix='Write each message as {"role": ..., "content": ...}.',
                )
                roles_ok = False
                continue
            role = m.get("role", _MISSING)
            content = m.get("content", _MISSING)
            if type(role) is not str or role not in _ROLE_SET:
                role = self._bad_role(role, m, ref, index, conv_id, j)
                roles_ok = False
            elif role == "assistant":
                has_assistant = True
            if type(content) is not str:
                content = self._require_str(
                    m, "content", ref, ("messages", j), index, conv_id, None, what="the message text"
                )
                if content is None:
                    continue
            if not content or content.isspace():
                target = role == "assistant"
                self._empty(
                    content,
                    "content",
                    _CRIT if target else _WARN,
                    ref,
                    ("messages", j, "content"),
                    index,
                    conv_id,
                    None,
                    "Write the assistant reply the model should learn, or remove the turn."
                    if target
                    else "Write the message text, or remove the turn.",
                )
            chars += len(content)
            roles.append(role or "")
            contents.append(content)
        n = len(msgs)
        last = msgs[-1]
        if not has_assistant:
            if roles_ok:  # otherwise the bad roles were already reported
                self.emit(
                    IssueType.NO_FINAL_ASSISTANT,
                    _CRIT,
                    "conversation has no assistant turn; there is nothing to learn",
                    ref,
                    ("messages",),
                    index=index,
                    conv_id=conv_id,
                    expected="an assistant message at the end",
                    found=f"roles {_roles_summary(msgs)}",
                    fix="Add the assistant reply the model should learn as the last message.",
                )
        elif type(last) is dict and last.get("role") in ("system", "user"):
            self.emit(
                IssueType.NO_FINAL_ASSISTANT,
                _WARN,
                f"conversation ends with a {clip(str(last.get('role')), 20)} turn, which is not trained on",
                ref,
                ("messages", n - 1),
                index=index,
                conv_id=conv_id,
                expected="an assistant message at the end",
                found=f"role {describe(last.get('role'))}",
                fix="End with the assistant reply, or remove the trailing turn.",
            )
        weight = self._weight(obj, ref, index, conv_id)
        if self.n_critical != mark:
            return
        self._duplicate((tuple(roles), tuple(contents)), ref, (), index, None, conv_id)
        self._count_example(chars, n)
        if self.need_messages:
            messages = tuple(map(Message, roles, contents))
            example = Example(messages=messages, index=index, conversation_id=conv_id, weight=weight)
            self._deliver(example, ref, (), index, None, conv_id)

    def _bad_role(self, role: Any, m: dict[str, Any], ref: Ref, index: int, conv_id: str | None, j: int) -> str | None:
        if type(role) is str:
            self.emit(
                IssueType.UNKNOWN_ROLE,
                _CRIT,
                f"unknown role {clip(role, 30)!r}; expected system, user or assistant",
                ref,
                ("messages", j, "role"),
                index=index,
                conv_id=conv_id,
                expected="system | user | assistant",
                found=describe(role),
                fix=_role_fix(role),
            )
            return role
        self._require_str(m, "role", ref, ("messages", j), index, conv_id, None, what="the role")
        return None

    # -- record checks: instruction -------------------------------------------

    def check_instruction(self, obj: Any, index: int, ref: Ref, mark: int) -> None:
        if type(obj) is not dict:
            self._not_object(obj, index, ref, "an object with 'instruction' and 'output'")
            return
        conv_id = None
        raw_id = obj.get("id")
        if raw_id is not None:
            conv_id = self._check_id(raw_id, ref, ("id",), index, "id")
        instruction = self._require_str(obj, "instruction", ref, (), index, conv_id, None, what="the task text")
        output = self._require_str(obj, "output", ref, (), index, conv_id, None, what="the answer")
        extra = obj.get("input")
        if extra is None:
            extra = ""
        elif type(extra) is not str:
            self.emit(
                IssueType.INVALID_DATA_TYPE,
                _CRIT,
                f"'input' must be a string, found {json_type(extra)}",
                ref,
                ("input",),
                index=index,
                conv_id=conv_id,
                expected="string or null",
                found=describe(extra),
                fix="Write 'input' as a string, or remove it.",
            )
            extra = ""
        if instruction is not None and (not instruction or instruction.isspace()):
            self._empty(
                instruction,
                "instruction",
                _WARN,
                ref,
                ("instruction",),
                index,
                conv_id,
                None,
                "Write the task the model should perform.",
            )
        if output is not None and (not output or output.isspace()):
            self._empty(
                output,
                "output",
                _CRIT,
                ref,
                ("output",),
                index,
                conv_id,
                None,
                "Write the answer the model should learn, or remove the record.",
            )
        weight = self._weight(obj, ref, index, conv_id)
        if self.n_critical != mark or instruction is None or output is None:
            return
        self._duplicate((instruction, extra, output), ref, (), index, None, conv_id)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        self._count_example(len(user) + len(output), 2)
        if self.need_messages:
            example = Example(
                messages=(Message("user", user), Message("assistant", output)),
                index=index,
                conversation_id=conv_id,
                weight=weight,
            )
            self._deliver(example, ref, (), index, None, conv_id)

    # -- record checks: conversations ------------------------------------------

    def check_conversation(self, conv: Any, index: int, ref: Ref, mark: int) -> None:
        if type(conv) is not dict:
            self._not_object(conv, index, ref, "a conversation object")
            return
        res = self.res
        raw_id = conv.get("conversation_id", _MISSING)
        conv_id = None
        if raw_id is _MISSING or raw_id is None:
            self.emit(
                IssueType.MISSING_ID,
                _WARN,
                "conversation has no 'conversation_id'",
                ref,
                ("conversation_id",),
                index=index,
                expected="a unique string id",
                found="missing" if raw_id is _MISSING else "null",
                fix="Add a unique 'conversation_id' so errors and duplicates can name it.",
            )
        else:
            conv_id = self._check_id(raw_id, ref, ("conversation_id",), index, "conversation_id")
        rating = conv.get("quality_score")
        if rating is not None:
            value = self._rating(rating, ref, ("quality_score",), index, conv_id)
            if value is not None:
                res.rating_sum += value
                res.rating_count += 1
        pairs = conv.get("training_pairs", _MISSING)
        if type(pairs) is not list:
            hint: str | None = None
            if "messages" in conv:
                hint = "This looks like chat JSONL: validate it with format chat_jsonl, one object per line."
            self._bad_container(pairs, "training_pairs", "array of training pairs", index, conv_id, ref, (), hint)
            return
        if not pairs:
            self._empty_array("training_pairs", index, conv_id, ref, ("training_pairs",), "Add training pairs.")
            return
        conv_meta = conv.get("scaffolding_metadata")
        if type(conv_meta) is not dict:
            conv_meta = None
        for k, pair in enumerate(pairs):
            pmark = self.n_critical
            here = ("training_pairs", k)
            if type(pair) is not dict:
                self.emit(
                    IssueType.INVALID_DATA_TYPE,
                    _CRIT,
                    f"training pair must be an object, found {json_type(pair)}",
                    ref,
                    here,
                    index=index,
                    conv_id=conv_id,
                    pair=k,
                    expected="object {prompt_context, user_query, target_response}",
                    found=describe(pair),
                    fix="Write each training pair as an object with user_query and target_response.",
                )
                continue
            context = pair.get("prompt_context")
            query = pair.get("user_query")
            target = pair.get("target_response")
            meta = pair.get("scaffolding_metadata")
            if (
                type(query) is str
                and type(target) is str
                and (context is None or type(context) is str)
                and (meta is None or type(meta) is dict)
                and query
                and target
                and not query.isspace()
                and not target.isspace()
            ):
                # A well-formed pair: nothing to report, skip the field-by-field checks.
                if context is None:
                    context = ""
                if meta is None:
                    meta = conv_meta
            else:
                if context is None:
                    context = ""
                elif type(context) is not str:
                    self.emit(
                        IssueType.INVALID_DATA_TYPE,
                        _CRIT,
                        f"'prompt_context' must be a string, found {json_type(context)}",
                        ref,
                        (*here, "prompt_context"),
                        index=index,
                        conv_id=conv_id,
                        pair=k,
                        expected="string or null",
                        found=describe(context),
                        fix="Write 'prompt_context' as a string (the system prompt), or remove it.",
                    )
                    context = ""
                query = self._require_str(pair, "user_query", ref, here, index, conv_id, k, what="the user's message")
                target = self._require_str(
                    pair, "target_response", ref, here, index, conv_id, k, what="the reply to learn"
                )
                if query is not None and (not query or query.isspace()):
                    self._empty(
                        query,
                        "user_query",
                        _WARN,
                        ref,
                        (*here, "user_query"),
                        index,
                        conv_id,
                        k,
                        "Write the user's message this reply answers.",
                    )
                if target is not None and (not target or target.isspace()):
                    self._empty(
                        target,
                        "target_response",
                        _CRIT,
                        ref,
                        (*here, "target_response"),
                        index,
                        conv_id,
                        k,
                        "Add the target response text in the conversation editor.",
                    )
                if meta is None:  # missing or null: the conversation's
                    meta = conv_meta
                elif type(meta) is not dict:
                    self.emit(
                        IssueType.INVALID_DATA_TYPE,
                        _WARN,
                        f"'scaffolding_metadata' must be an object, found {json_type(meta)}",
                        ref,
                        (*here, "scaffolding_metadata"),
                        index=index,
                        conv_id=conv_id,
                        pair=k,
                        expected="object {persona, emotional_arc, topic}",
                        found=describe(meta),
                        fix="Write scaffolding_metadata as an object, or remove it.",
                    )
                    meta = None
                if self.n_critical != pmark or query is None or target is None:
                    continue
            metadata = self._scaffolding(meta, ref, here, index, conv_id, k)
            self._duplicate((context, query, target), ref, here, index, k, conv_id)
            self._count_example(len(context) + len(query) + len(target), 3 if context.strip() else 2)
            if self.need_messages:
                messages = ((Message("system", context),) if context.strip() else ()) + (
                    Message("user", query),
                    Message("assistant", target),
                )
                example = Example(
                    messages=messages,
                    index=index,
                    conversation_id=conv_id,
                    pair_index=k,
                    metadata=metadata,
                )
                self._deliver(example, ref, here, index, k, conv_id)

    def _scaffolding(
        self,
        meta: dict[str, Any] | None,
        ref: Ref,
        here: tuple[str | int, ...],
        index: int,
        conv_id: str | None,
        k: int,
    ) -> dict[str, str]:
        if meta is None:
            return {}
        persona: Any = meta.get("persona")
        arc: Any = meta.get("emotional_arc")
        topic: Any = meta.get("topic")
        fast = type(persona) is str and type(arc) is str and type(topic) is str
        if fast:
            # The common case, counted without the per-field loop below.
            self._tally(self.scaffolding["persona"], persona)
            self._tally(self.scaffolding["emotional_arc"], arc)
            self._tally(self.scaffolding["topic"], topic)
            self.res.pairs_with_metadata += 1
            self._tally(self.res.combinations, f"{persona} x {arc}")
            if not self.need_messages:
                return {}
            if len(meta) == 3:
                return {"persona": persona, "emotional_arc": arc, "topic": topic}
        return self._scaffolding_fields(meta, ref, here, index, conv_id, k, fast)

    @staticmethod
    def _tally(counter: Counter[str], value: str) -> None:
        if value in counter or len(counter) < MAX_DISTINCT_VALUES:
            counter[value] += 1
        else:
            counter["(other)"] += 1

    def _scaffolding_fields(
        self,
        meta: dict[str, Any],
        ref: Ref,
        here: tuple[str | int, ...],
        index: int,
        conv_id: str | None,
        k: int,
        counted: bool,
    ) -> dict[str, str]:
        """The metadata as text; reports mistyped fields and counts them unless ``counted``."""
        out: dict[str, str] = {}
        for name, value in meta.items():
            if isinstance(value, str):
                out[name] = value
            elif isinstance(value, int | float) and not isinstance(value, bool):
                out[name] = str(value)
        if counted:
            return out
        complete = True
        for name in _SCAFFOLD_FIELDS:
            value = meta.get(name)
            if value is None:
                complete = False
                continue
            if not isinstance(value, str):
                complete = False
                self.emit(
                    IssueType.INVALID_DATA_TYPE,
                    _WARN,
                    f"'{name}' must be a string, found {json_type(value)}",
                    ref,
                    (*here, "scaffolding_metadata", name),
                    index=index,
                    conv_id=conv_id,
                    pair=k,
                    expected="string",
                    found=describe(value),
                    fix=f"Write {name} as a string label.",
                )
                continue
            self._tally(self.scaffolding[name], value)
        if complete:
            self.res.pairs_with_metadata += 1
            self._tally(self.res.combinations, f"{meta['persona']} x {meta['emotional_arc']}")
        return out

    def _rating(
        self, value: Any, ref: Ref | None, comps: tuple[str | int, ...], index: int | None, conv_id: str | None
    ) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.emit(
                IssueType.INVALID_DATA_TYPE,
                _WARN,
                f"'quality_score' must be a number, found {json_type(value)}",
                ref,
                comps,
                index=index,
                conv_id=conv_id,
                expected="number from 0 to 5",
                found=describe(value),
                fix="Write the quality rating as a number from 0 to 5.",
            )
            return None
        if not (0.0 <= float(value) <= RATING_MAX):
            self.emit(
                IssueType.INVALID_VALUE,
                _WARN,
                f"'quality_score' must be between 0 and 5, found {value!r}",
                ref,
                comps,
                index=index,
                conv_id=conv_id,
                expected="number from 0 to 5",
                found=describe(value),
                fix="Rate quality on the 0-5 scale.",
            )
            return None
        return float(value)

    # -- shared record problems --------------------------------------------------

    def _not_object(self, obj: Any, index: int, ref: Ref, what: str, hint: str = "") -> None:
        self.emit(
            IssueType.INVALID_DATA_TYPE,
            _CRIT,
            f"record must be {what}, found {json_type(obj)}",
            ref,
            (),
            index=index,
            expected=what,
            found=describe(obj),
            fix=hint or f"Write the record as {what}.",
        )

    def _bad_container(
        self,
        value: Any,
        key: str,
        what: str,
        index: int,
        conv_id: str | None,
        ref: Ref,
        comps: tuple[str | int, ...],
        hint: str | None = None,
    ) -> None:
        if value is _MISSING or value is None:
            self.emit(
                IssueType.MISSING_REQUIRED_FIELD,
                _CRIT,
                f"missing required field '{key}'" if value is _MISSING else f"required field '{key}' is null",
                ref,
                (*comps, key),
                index=index,
                conv_id=conv_id,
                expected=what,
                found="missing" if value is _MISSING else "null",
                fix=hint or f"Add '{key}': the {what}.",
            )
        else:
            self.emit(
                IssueType.INVALID_DATA_TYPE,
                _CRIT,
                f"'{key}' must be an array, found {json_type(value)}",
                ref,
                (*comps, key),
                index=index,
                conv_id=conv_id,
                expected=what,
                found=describe(value),
                fix=hint or f"Write '{key}' as a JSON array.",
            )

    def _empty_array(
        self,
        key: str,
        index: int,
        conv_id: str | None,
        ref: Ref,
        comps: tuple[str | int, ...],
        fix: str,
    ) -> None:
        self.emit(
            IssueType.EMPTY_ARRAY,
            _CRIT,
            f"'{key}' is empty",
            ref,
            comps,
            index=index,
            conv_id=conv_id,
            expected="at least one element",
            found="empty array",
            fix=fix + " Or remove the record.",
        )

    # -- tokenizer-aware checks -----------------------------------------------------

    def _deliver(
        self,
        example: Example,
        ref: Ref,
        comps: tuple[str | int, ...],
        index: int,
        pair: int | None,
        conv_id: str | None,
    ) -> None:
        if self.tokens is not None:
            self._token_check(example, ref, comps, index, pair, conv_id)
        if self.on_example is not None:
            self.on_example(example)

    def _token_check(
        self,
        example: Example,
        ref: Ref,
        comps: tuple[str | int, ...],
        index: int,
        pair: int | None,
        conv_id: str | None,
    ) -> None:
        from brightrun.validation.chat import ChatTemplateError

        tc = self.tokens
        assert tc is not None
        totals = tc.totals
        limit = tc.max_seq_len
        try:
            m = tc.encoder.measure(example.messages, limit)
        except ChatTemplateError as e:
            totals.template_errors += 1
            self.emit(
                IssueType.TEMPLATE_ERROR,
                _CRIT,
                f"the chat template cannot render this example: {clip(str(e), 200)}",
                ref,
                comps,
                index=index,
                conv_id=conv_id,
                pair=pair,
                expected="an example the chat template accepts",
                found=f"roles {' → '.join(msg.role for msg in example.messages)}",
                fix="Reorder or merge messages so the template accepts them "
                "(many templates need user and assistant turns to alternate).",
            )
            return
        totals.examples += 1
        totals.tokens += m.n_tokens
        totals.target_tokens += m.n_target_tokens
        totals.lengths.add(m.n_tokens)
        for j in m.dropped:
            self.emit(
                IssueType.TEMPLATE_DROPS_CONTENT,
                _WARN,
                f"the chat template leaves out the {example.messages[j].role} message's text",
                ref,
                comps,
                index=index,
                conv_id=conv_id,
                pair=pair,
                expected="every message rendered",
                found=f"{example.messages[j].role} message missing from the rendered text",
                fix="Merge that text into a message the template keeps (often the first user turn).",
            )
        if m.truncated:
            over = m.n_tokens - limit
            totals.over_max += 1
            totals.tokens_over_max += over
            totals.max_overflow = max(totals.max_overflow, over)
            if m.n_target_tokens < m.n_target_tokens_full:
                totals.targets_truncated += 1
            if m.n_target_tokens > 0:
                self.emit(
                    IssueType.TOKEN_LENGTH_EXCEEDED,
                    _WARN,
                    f"{m.n_tokens} tokens, {over} over max_seq_len {limit}; "
                    f"{m.n_target_tokens_full - m.n_target_tokens} of "
                    f"{m.n_target_tokens_full} target tokens are cut",
                    ref,
                    comps,
                    index=index,
                    conv_id=conv_id,
                    pair=pair,
                    expected=f"<= {limit} tokens",
                    found=f"{m.n_tokens} tokens",
                    fix=f"Shorten the example by {over} tokens, split it, or raise max_seq_len.",
                )
        if m.n_target_tokens == 0:
            if m.n_target_tokens_full > 0:
                message = (
                    f"all {m.n_target_tokens_full} target tokens fall after max_seq_len {limit} "
                    f"({m.n_tokens} tokens in total); nothing is learned from this example"
                )
                fix = f"Shorten the prompt by at least {m.n_tokens - limit} tokens or raise max_seq_len."
            else:
                message = "the assistant reply produces no target tokens with this chat template"
                fix = "Check that the reply is not empty and that the template renders it."
            self.emit(
                IssueType.ALL_LABELS_MASKED,
                _CRIT,
                message,
                ref,
                comps,
                index=index,
                conv_id=conv_id,
                pair=pair,
                expected="at least one target token",
                found=f"0 of {m.n_target_tokens_full} target tokens kept",
                fix=fix,
            )

    # -- drivers ------------------------------------------------------------------------

    def records(self, f: IO[bytes], size: int) -> Generator[None, None, None]:
        """Validate the open binary file ``f`` of ``size`` bytes, yielding once per record."""
        res = self.res
        res.size_bytes = size
        try:
            start = self._preamble(f)
            if start is not None:
                if self.fmt is DatasetFormat.CONVERSATIONS and not _looks_like_jsonl(f, start):
                    yield from _DocReader(self, f, start).run()
                else:
                    yield from self._run_jsonl(f, start)
        except _Abort as e:
            res.aborted = str(e)
        if res.records == 0 and not res.aborted and self.n_critical == 0:
            self.emit(
                IssueType.EMPTY_ARRAY,
                _CRIT,
                "the file holds no examples" if size else "the file is empty",
                None,
                ("conversations",) if self.root else (),
                expected="at least one record",
                found="only whitespace" if size else "empty file",
                fix="Write at least one example (and more than 500 for a useful fine-tune).",
            )
        self.flush_lengths()
        res.examples = res.char_lengths.count
        res.messages = self.n_messages
        res.content_chars = res.char_lengths.total
        res.critical = self.n_critical
        res.warning = self.n_warning
        res.duplicate_index_bytes = self.content_index.nbytes + self.id_index.nbytes
        if self.tokens is not None:
            res.tokens = self.tokens.totals

    def run(self, f: IO[bytes], size: int) -> EngineResult:
        """Validate the whole file; return what was found."""
        for _ in self.records(f, size):
            pass
        return self.res

    def iter_run(self, f: IO[bytes], pending: list[Example]) -> Iterator[Example]:
        """Validate while yielding the examples ``on_example`` collected in ``pending``."""
        size = os.fstat(f.fileno()).st_size
        for _ in self.records(f, size):
            if pending:
                yield from pending
                pending.clear()
        if pending:
            yield from pending
            pending.clear()

    def _preamble(self, f: IO[bytes]) -> int | None:
        """Handle byte order marks and non-text files; return the data's start."""
        head = f.read(4)
        if head.startswith(codecs.BOM_UTF8):
            self.emit(
                IssueType.ENCODING_ERROR,
                _WARN,
                "the file starts with a UTF-8 byte order mark (BOM)",
                None,
                where=(1, 1, 0),
                expected="UTF-8 without BOM",
                found="bytes EF BB BF",
                fix="Save the file as UTF-8 without BOM; some tools reject it.",
            )
            f.seek(3)
            return 3
        kind = None
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            kind = ("UTF-16", "Re-encode the file as UTF-8 (iconv -f UTF-16 -t UTF-8).")
        elif head.startswith(b"\x1f\x8b"):
            kind = ("gzip-compressed", "Decompress the file first (gunzip).")
        elif head.startswith(b"PK\x03\x04"):
            kind = ("a ZIP archive", "Extract the dataset file from the archive.")
        elif len(head) >= 2 and (head[0] == 0) != (head[1] == 0):
            kind = ("UTF-16 without BOM", "Re-encode the file as UTF-8 (iconv -f UTF-16 -t UTF-8).")
        if kind is not None:
            self.emit(
                IssueType.ENCODING_ERROR,
                _CRIT,
                f"the file is {kind[0]}, not UTF-8 text; validation stopped",
                None,
                where=(1, 1, 0),
                expected="UTF-8 JSON text",
                found=f"bytes {head[:4].hex(' ').upper()}",
                fix=kind[1],
            )
            self.res.aborted = f"file is {kind[0]}"
            return None
        f.seek(0)
        return 0

    #: Bytes read at a time by the JSON Lines reader.
    BLOCK = 64 * 1024

    def _run_jsonl(self, f: IO[bytes], offset: int) -> Generator[None, None, None]:
        """JSON Lines, any format, read in blocks of whole lines.

        For chat files, a block is first parsed in one call as a JSON array (its
        line breaks turned into commas) and each record takes an inlined fast path
        that accepts it only when every check passes at C speed (a ``messages``
        list of role / content strings, known roles, the last one the assistant's,
        no empty text). A block that does not parse that way (a blank or malformed
        line, two values on a line, a suspicious escape) and every record the fast
        path refuses go line by line through :meth:`_line`, which finds and
        locates each problem.
        """
        check = {
            DatasetFormat.CHAT_JSONL: self.check_chat,
            DatasetFormat.INSTRUCTION_JSONL: self.check_instruction,
            DatasetFormat.CONVERSATIONS: self.check_conversation,
        }[self.fmt]
        fast = self.fmt is DatasetFormat.CHAT_JSONL
        read = f.read
        block_size = self.BLOCK
        limit = self.max_record_bytes
        loads = _json._fast_loads
        res = self.res
        yield_each = self.on_example is not None
        need_messages = self.need_messages
        role_of, content_of = itemgetter("role"), itemgetter("content")
        known_roles = _ROLE_SET.issuperset
        isspace = str.isspace
        suspect = _suspect
        content_index = self.content_index
        lengths = self.lengths
        n_messages = 0
        line_no = 0
        index = -1
        self._with_errors = 0
        pending = b""
        try:
            while True:
                # Read at least as much as is pending: a long line costs O(length).
                chunk = read(max(block_size, len(pending)))
                if not chunk:
                    if not pending:
                        break
                    data = pending + b"\n"  # a last line without line break
                    pending = b""
                else:
                    data = pending + chunk if pending else chunk
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    if len(data) <= limit:
                        pending = data
                        continue
                    # A line above the size limit: report it, skip to its end.
                    line_no += 1
                    index += 1
                    skipped = len(data) + self._skip_rest_of_line(f)
                    self._too_large(skipped, index, line_no, offset)
                    offset += skipped
                    pending = b""
                    if yield_each:
                        yield
                    continue
                pending = data[cut:]
                block = _Block(data, cut, line_no + 1, offset)
                n_lines = data.count(b"\n", 0, cut)
                records: Any = None
                if fast and cut <= limit and not suspect(data, 0, cut):
                    # The lines as one JSON array ("replace" beats "translate" here).
                    try:
                        records = loads(b"[" + data[: cut - 1].replace(b"\n", b",") + b"]")
                    except Exception:
                        records = None
                    if records is not None and len(records) != n_lines:
                        records = None  # two values on one line: go line by line
                if records is not None:
                    content_index = self.content_index
                    keys, vals = content_index._keys, content_index._vals
                    mask, grow_at = content_index._mask, content_index._limit
                    for k, obj in enumerate(records):
                        index += 1
                        # -- fast path (keep in sync with the per-line one below) --
                        try:
                            msgs = obj["messages"]
                            roles = list(map(role_of, msgs))
                            contents = list(map(content_of, msgs))
                            chars = len("".join(contents))
                            good = (
                                roles[-1] == "assistant"
                                and known_roles(roles)
                                and all(contents)
                                and not any(map(isspace, contents))
                                and (len(obj) == 1 or ("id" not in obj and "weight" not in obj))
                            )
                        except Exception:
                            good = False
                        if not good:
                            self._line(block, k, obj, index, check)
                        else:
                            # HashIndex.add, inlined: linear probing for a free or equal key.
                            h = (hash((tuple(roles), tuple(contents))) & _M64) or 1
                            i = h & mask
                            while True:
                                slot = keys[i]
                                if slot == 0:
                                    keys[i] = h
                                    vals[i] = index << 20
                                    content_index._n += 1
                                    if content_index._n > grow_at:
                                        content_index._grow()
                                        keys, vals = content_index._keys, content_index._vals
                                        mask, grow_at = content_index._mask, content_index._limit
                                    break
                                if slot == h:
                                    self._report_duplicate(vals[i], block.ref(k), (), index, None, None)
                                    break
                                i = (i + 1) & mask
                            n_messages += len(msgs)
                            lengths.append(chars)
                            if need_messages:
                                example = Example(messages=tuple(map(Message, roles, contents)), index=index)
                                self._deliver(example, block.ref(k), (), index, None, None)
                        if yield_each:
                            yield
                    line_no += n_lines
                else:
                    for k, raw in enumerate(block.lines()):
                        line_no += 1
                        if not raw or (raw[0] != 123 and raw.isspace()):  # 123 is "{"
                            continue
                        index += 1
                        obj = _UNPARSED
                        if fast and len(raw) <= limit and not suspect(raw):
                            try:
                                obj = loads(raw)
                                msgs = obj["messages"]
                                roles = list(map(role_of, msgs))
                                contents = list(map(content_of, msgs))
                                chars = len("".join(contents))
                                good = (
                                    roles[-1] == "assistant"
                                    and known_roles(roles)
                                    and all(contents)
                                    and not any(map(isspace, contents))
                                    and (len(obj) == 1 or ("id" not in obj and "weight" not in obj))
                                )
                            except Exception:
                                good = False
                            if good:
                                h = (hash((tuple(roles), tuple(contents))) & _M64) or 1
                                first = content_index.add(h, index << 20)
                                if first >= 0:
                                    self._report_duplicate(first, block.ref(k), (), index, None, None)
                                n_messages += len(msgs)
                                lengths.append(chars)
                                if need_messages:
                                    messages = tuple(map(Message, roles, contents))
                                    example = Example(messages=messages, index=index)
                                    self._deliver(example, block.ref(k), (), index, None, None)
                                if yield_each:
                                    yield
                                continue
                        self._line(block, k, obj, index, check)
                        if yield_each:
                            yield
                offset += cut
                if len(lengths) >= 1 << 16:
                    self.flush_lengths()
                    lengths = self.lengths
        finally:
            res.records = index + 1
            res.records_with_errors = self._with_errors
            self.n_messages += n_messages

    def _line(self, block: _Block, k: int, obj: Any, index: int, check: Callable[..., None]) -> None:
        """Check line ``k`` of ``block`` (``obj`` is its value, or _UNPARSED) in full."""
        ref = block.ref(k)
        raw, _, line, offset, _ = ref
        assert isinstance(raw, bytes)
        assert offset is not None
        mark = self.n_critical
        if len(raw) > self.max_record_bytes:
            self._too_large(len(raw) + 1, index, line, offset)
        else:
            parsed_fast = True
            if obj is _UNPARSED:
                try:
                    obj = _json._fast_loads(raw)
                except Exception:
                    obj = self._slow_line(raw, ref, index)  # checks escapes itself
                    parsed_fast = False
            if obj is not _BAD:
                if parsed_fast and _suspect(raw):
                    self._check_strings(obj, ref, index)
                check(obj, index, ref, mark)
        if self.n_critical != mark:
            self._with_errors += 1

    def _too_large(self, n: int, index: int, line: int, offset: int) -> None:
        self.emit(
            IssueType.RECORD_TOO_LARGE,
            _CRIT,
            f"line is {n} bytes, above the {self.max_record_bytes}-byte limit",
            None,
            index=index,
            where=(line, 1, offset),
            expected=f"<= {self.max_record_bytes} bytes",
            found=f"{n} bytes",
            fix="Split the record or remove it.",
        )
        self._with_errors += 1

    def _skip_rest_of_line(self, f: IO[bytes]) -> int:
        skipped = 0
        while True:
            chunk = f.readline(1 << 20)
            skipped += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                return skipped

    def _slow_line(self, raw: bytes, ref: Ref, index: int) -> Any:
        """Say why the fast parser refused a line; return the value or ``_BAD``."""
        _, _, line, offset, _ = ref
        assert offset is not None  # JSON Lines records know their offset
        bad_bytes = False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_bytes = True
            bad = _count_invalid(raw)
            self.encoding_errors += bad
            prefix = raw[: e.start].decode("utf-8", "replace")
            seq = raw[e.start : e.end]
            more = f" (and {bad - 1} more on this line)" if bad > 1 else ""
            self.emit(
                IssueType.ENCODING_ERROR,
                _CRIT,
                f"invalid UTF-8 byte sequence {seq.hex(' ').upper()} at byte {offset + e.start}{more}",
                None,
                index=index,
                where=(line, len(prefix) + 1, offset + e.start),
                expected="UTF-8 text",
                found=f"bytes {seq.hex(' ').upper()}",
                fix="Re-encode the file as UTF-8 (for example: iconv -f latin1 -t utf-8).",
            )
            if self.encoding_errors > MAX_ENCODING_ERRORS:
                raise _Abort("too many invalid byte sequences: the file is not UTF-8 text") from None
            # One character per invalid byte, so positions map back to exact bytes.
            text = raw.decode("utf-8", "surrogateescape")
        nul = text.find("\x00")
        if nul >= 0:
            self.emit(
                IssueType.ENCODING_ERROR,
                _CRIT,
                f"NUL byte in the line ({text.count(chr(0))} in total)",
                None,
                index=index,
                where=(line, nul + 1, offset + _utf8_len(text[:nul])),
                expected="text without NUL bytes",
                found="byte 00",
                fix="Remove the NUL bytes; the file may be binary or UTF-16.",
            )
            text = text.replace("\x00", " ")
        # Without the line break, an unclosed string reads as "Unterminated string".
        text = text.rstrip("\r\n")
        sref: Ref = (text, 0, line, offset, 0)
        try:
            obj = _json.strict_loads(text)
        except JSONDecodeError as e:
            self._malformed(sref, index, e.pos, e.msg, jsonl=True)
            return _BAD
        except JSONConstantError as e:
            at = _constant_position(text, 0, e.name)
            self._malformed(sref, index, at, f"{e.name} is not valid JSON", jsonl=True)
            return _BAD
        except RecursionError:
            self._malformed(sref, index, 0, "nested too deeply", jsonl=True)
            return _BAD
        if "\\u" in text:
            self._check_strings(obj, sref, index, escaped_bytes=bad_bytes)
        return obj

    def _malformed(self, ref: Ref, index: int | None, pos: int, msg: str, *, jsonl: bool) -> None:
        text = ref[0]
        assert isinstance(text, str)
        if msg.endswith("is not valid JSON"):
            fix = "Use null or a finite number; NaN and Infinity are not JSON."
        elif msg == "nested too deeply":
            fix = "Flatten the structure; nesting this deep is never a dataset record."
        else:
            fix = _json.malformed_fix(msg, text, pos, jsonl=jsonl)
        self.emit(
            IssueType.MALFORMED_JSON,
            _CRIT,
            f"malformed JSON: {msg}",
            ref,
            index=index,
            pos=pos,
            expected="valid JSON",
            found=_snippet(text, pos) or "end of line",
            fix=fix,
        )

    def _check_strings(self, obj: Any, ref: Ref, index: int, *, escaped_bytes: bool = False) -> None:
        """Find escaped NULs and unpaired surrogates (``\\u0000``, ``\\ud800``).

        ``escaped_bytes``: the record's text holds invalid bytes decoded with
        ``surrogateescape`` (U+DC80-U+DCFF), already reported as encoding errors.
        """
        surrogate = _SURROGATE_NOT_ESCAPED if escaped_bytes else _SURROGATE
        for comps, text in _walk_strings(obj, ()):
            if surrogate.search(text):
                self.emit(
                    IssueType.ENCODING_ERROR,
                    _CRIT,
                    "string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)",
                    ref,
                    comps,
                    index=index,
                    expected="valid Unicode text",
                    found=describe(text),
                    fix="Replace the broken escape; it usually comes from text cut in the middle of an emoji.",
                )
            if "\x00" in text:
                self.emit(
                    IssueType.ENCODING_ERROR,
                    _WARN,
                    "string holds a NUL character (\\u0000)",
                    ref,
                    comps,
                    index=index,
                    expected="text without NUL characters",
                    found=describe(text),
                    fix="Remove the \\u0000 escapes.",
                )


_CONSTANT = re.compile(r"[:,\[]\s*(-?(?:NaN|Infinity))")


def _constant_position(text: str, start: int, name: str) -> int:
    """Where the JSON-invalid constant ``name`` stands as a value (not inside a string)."""
    for m in _CONSTANT.finditer(text, start):
        if m.group(1) == name:
            return m.start(1)
    at = text.find(name, start)
    return at if at >= 0 else start


def _snippet(text: str, pos: int, width: int = 24) -> str:
    """The text at ``pos`` up to the line end, clipped, for ``found``."""
    piece = text[pos : pos + width + 1].split("\n", 1)[0].rstrip("\r")
    return _printable(clip(piece, width))


def _printable(text: str) -> str:
    """``text`` made safe to print and encode: no NULs, no lone surrogates."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _walk_strings(obj: Any, comps: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(obj, comps)]
    while stack:
        value, here = stack.pop()
        if isinstance(value, str):
            yield here, value
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((v, (*here, str(k))))
        elif isinstance(value, list):
            for k, v in enumerate(value):
                stack.append((v, (*here, k)))


def _count_invalid(raw: bytes) -> int:
    count = 0
    view = memoryview(raw)
    pos = 0
    while pos < len(raw) and count < MAX_ENCODING_ERRORS:
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            break
        except UnicodeDecodeError as e:
            count += 1
            pos += e.end
    return count


def _roles_summary(msgs: list[Any]) -> str:
    roles = [clip(str(m.get("role")), 12) if isinstance(m, dict) else "?" for m in msgs[:6]]
    return " → ".join(roles) + (" → …" if len(msgs) > 6 else "")


def _role_fix(role: str) -> str:
    lowered = role.strip().lower()
    aliases = {
        "human": "user",
        "gpt": "assistant",
        "bot": "assistant",
        "model": "assistant",
        "ai": "assistant",
        "chatbot": "assistant",
        "developer": "system",
        "prompt": "user",
    }
    if lowered in _ROLE_SET and lowered != role:
        return f"Write the role in lower case without spaces: {lowered!r}."
    if lowered in aliases:
        return f"Rename role {role!r} to {aliases[lowered]!r}."
    if lowered in ("tool", "function", "ipython"):
        return "Tool and function turns are not supported; remove them or fold them into the text."
    return "Use one of the roles system, user, assistant."


def _locate(
    ref: Ref,
    comps: tuple[str | int, ...],
    pos: int | None,
    byte_at: Callable[[int], int] | None = None,
) -> tuple[int, int, int]:
    """(line, column, byte offset) of ``pos`` or of ``comps`` inside the record."""
    text, start, line, byte, col0 = ref
    s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    if pos is None:
        pos, _ = _json.locate(s, start, comps)
    pos = max(start, min(pos, len(s)))
    newlines = s.count("\n", start, pos)
    column = pos - s.rfind("\n", start, pos) if newlines else col0 + (pos - start) + 1
    if byte is None:
        assert byte_at is not None
        return line + newlines, column, byte_at(pos)
    return line + newlines, column, byte + _utf8_len(s[start:pos])


def _utf8_len(text: str) -> int:
    """Bytes of ``text`` in the file: invalid bytes were decoded with surrogateescape."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a surrogate that did not come from a byte
        return len(text.encode("utf-8", "surrogatepass"))


_WRAPPER = re.compile(rb'"conversations"\s*:\s*\[')
_CONVERSATION_START = re.compile(r'\{\s*"(?:conversation_id|training_pairs)"\s*:')


def _looks_like_jsonl(f: IO[bytes], start: int) -> bool:
    """True when a conversations file is JSON Lines (one conversation per line)."""
    f.seek(start)
    head = f.read(1 << 16)
    f.seek(start)
    text = head.lstrip()
    if not text or text.startswith(b"[") or _WRAPPER.search(head):
        return False
    first, sep, _ = text.partition(b"\n")
    if not sep:  # one line longer than the sniffed head, or a one-line file
        return text.startswith(b"{")
    try:
        value = _json.strict_loads(first.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        stripped = first.strip()
        return stripped.startswith(b"{") and stripped.endswith(b"}")
    return isinstance(value, dict)


# ---------------------------------------------------------------------------
# Streaming reader for conversations as one JSON document.

Where = tuple[int, int, int]
Gen = Generator[None, None, None]
GenPos = Generator[None, None, "int | None"]


class _DocReader:
    """A sliding text window over a JSON document; see the module doc.

    Positions are indices into ``self.buf``. Only :meth:`ensure` (and :meth:`skip`,
    which calls it) drops consumed text and so shifts positions; callers keep no
    position across those calls except the one they return, or the pinned one.
    """

    #: Characters kept available after the current position (grows for big values).
    LOOKAHEAD = 1 << 20
    #: Bytes per read.
    CHUNK = CHUNK_BYTES
    #: Bytes per byte-offset anchor.
    PIECE = 64 * 1024

    def __init__(self, engine: Engine, f: IO[bytes], start: int) -> None:
        self.e = engine
        self.f = f
        self.buf = ""
        self.base_line = 1
        self.base_col = 0
        #: Byte offsets of window positions, one anchor per decoded piece (64 KiB):
        #: a position's offset is its anchor's plus the UTF-8 length in between.
        self.anchor_chars: list[int] = [0]
        self.anchor_bytes: list[int] = [start]
        self.eof = False
        self.pending = b""
        self.read_bytes = start  # absolute offset of the next byte to read
        self.ascii = True
        self.pin: int | None = None
        self.index = -1
        self.with_errors = 0
        #: Set when element() returned the start of the next element after a resync.
        self.resynced = False
        # Cursor cache for line_col(): position, line, last newline before it.
        self.cpos = 0
        self.cline = 1
        self.cnl = -1
        engine.byte_at = self.byte_at

    # -- the window ------------------------------------------------------------------

    def _fill(self) -> bool:
        """Append the next chunk to the window; False at end of file."""
        if self.eof:
            return False
        data = self.f.read(self.CHUNK)
        chunk_start = self.read_bytes - len(self.pending)
        self.read_bytes += len(data)
        if not data:
            self.eof = True
            if not self.pending:
                return False
            data, self.pending = self.pending, b""
            cut = len(data)
        else:
            data = self.pending + data
            cut = _safe_cut(data)
            self.pending = data[cut:]
        base = len(self.buf)
        view = memoryview(data)
        try:
            text = codecs.utf_8_decode(view[:cut], "strict", True)[0]
        except UnicodeDecodeError:
            text = self._decode_pieces(data, cut, chunk_start, base)
        else:
            if base:
                self.anchor_chars.append(base)
                self.anchor_bytes.append(chunk_start)
            if not text.isascii():  # one anchor per piece: chars = non-continuation bytes
                a = chars = 0
                while a < cut:
                    b = min(cut, a + max(self.PIECE, 4))
                    if b < cut:
                        b = a + _safe_cut(view[a:b])
                    if a:
                        self.anchor_chars.append(base + chars)
                        self.anchor_bytes.append(chunk_start + a)
                    chars += len(data[a:b].translate(None, _CONTINUATION_BYTES))
                    a = b
            if "\x00" in text:
                text = self._nul(text, chunk_start)
        self.buf = self.buf + text if self.buf else text
        self.ascii = self.buf.isascii()
        return True

    def _decode_pieces(self, data: bytes, cut: int, chunk_start: int, base: int) -> str:
        """Decode a chunk holding invalid bytes piece by piece, with byte anchors."""
        parts: list[str] = []
        chars = 0
        view = memoryview(data)
        a = 0
        while a < cut:
            # At least 4 bytes: a piece then always holds a whole character.
            b = min(cut, a + max(self.PIECE, 4))
            if b < cut:
                b = a + _safe_cut(view[a:b])
            text = self._decode(data, a, b, chunk_start)
            if "\x00" in text:
                text = self._nul(text, chunk_start + a, "".join(parts))
            if a or base:
                self.anchor_chars.append(base + chars)
                self.anchor_bytes.append(chunk_start + a)
            parts.append(text)
            chars += len(text)
            a = b
        return "".join(parts)

    def _end_line_col(self) -> tuple[int, int]:
        """Line and 1-based column just after the current window's end."""
        buf = self.buf
        line = self.base_line + buf.count("\n")
        nl = buf.rfind("\n")
        return line, (len(buf) - nl if nl >= 0 else self.base_col + len(buf) + 1)

    def _decode(self, data: bytes, begin: int, cut: int, chunk_start: int) -> str:
        """Decode ``data[begin:cut]``; report invalid bytes (kept via surrogateescape)."""
        view = memoryview(data)[begin:cut]
        try:
            return codecs.utf_8_decode(view, "strict", True)[0]
        except UnicodeDecodeError:
            pass
        cut -= begin
        chunk_start += begin
        parts: list[str] = []
        line, column = self._end_line_col()
        pos = 0
        while pos < cut:
            try:
                parts.append(codecs.utf_8_decode(view[pos:], "strict", True)[0])
                break
            except UnicodeDecodeError as err:
                good = codecs.utf_8_decode(view[pos : pos + err.start], "strict", True)[0]
                parts.append(good)
                nl = good.count("\n")
                if nl:
                    line += nl
                    column = len(good) - good.rfind("\n")
                else:
                    column += len(good)
                at = chunk_start + pos + err.start
                seq = bytes(view[pos + err.start : pos + err.end])
                self.e.encoding_errors += 1
                self.e.emit(
                    IssueType.ENCODING_ERROR,
                    _CRIT,
                    f"invalid UTF-8 byte sequence {seq.hex(' ').upper()} at byte {at}",
                    None,
                    where=(line, column, at),
                    expected="UTF-8 text",
                    found=f"bytes {seq.hex(' ').upper()}",
                    fix="Re-encode the file as UTF-8 (for example: iconv -f latin1 -t utf-8).",
                )
                if self.e.encoding_errors > MAX_ENCODING_ERRORS:
                    raise _Abort("too many invalid byte sequences: the file is not UTF-8 text") from None
                # One character per invalid byte: byte offsets stay exact.
                parts.append(seq.decode("utf-8", "surrogateescape"))
                column += len(seq)
                pos += err.end
        return "".join(parts)

    def _nul(self, text: str, chunk_start: int, before_text: str = "") -> str:
        """Report the first NUL of ``text`` (which follows the window and ``before_text``)."""
        at = text.find("\x00")
        line, column = self._end_line_col()
        nl = before_text.count("\n")
        if nl:
            line += nl
            column = len(before_text) - before_text.rfind("\n")
        else:
            column += len(before_text)
        before = text[:at]
        nl = before.count("\n")
        if nl:
            line += nl
            column = len(before) - before.rfind("\n")
        else:
            column += len(before)
        self.e.emit(
            IssueType.ENCODING_ERROR,
            _CRIT,
            f"NUL byte in the file ({text.count(chr(0))} in this part)",
            None,
            where=(line, column, chunk_start + _utf8_len(before)),
            expected="text without NUL bytes",
            found="byte 00",
            fix="Remove the NUL bytes; the file may be binary or UTF-16.",
        )
        return text.replace("\x00", " ")

    def ensure(self, p: int, need: int | None = None) -> int:
        """Make ``need`` characters (default: LOOKAHEAD) after ``p`` available.

        May drop text before ``p`` (never before the pin); returns ``p`` shifted.
        """
        if need is None:
            need = self.LOOKAHEAD
        if len(self.buf) - p >= need or self.eof:
            return p
        keep = self.buf.rfind("\n", 0, p) + 1
        if p - keep > 4096:
            keep = p
        if self.pin is not None:
            keep = min(keep, self.pin)
        if keep > 0:
            self._drop(keep)
            p -= keep
        self.grow(p, need)
        return p

    def grow(self, p: int, need: int) -> None:
        """Read until ``need`` characters follow ``p`` or the file ends; drops nothing."""
        while len(self.buf) - p < need and self._fill():
            pass

    def _drop(self, keep: int) -> None:
        buf = self.buf
        new_base = self.byte_at(keep)
        self.base_line += buf.count("\n", 0, keep)
        nl = buf.rfind("\n", 0, keep)
        self.base_col = keep - nl - 1 if nl >= 0 else self.base_col + keep
        chars, nbytes = [0], [new_base]
        for c, b in zip(self.anchor_chars, self.anchor_bytes, strict=True):
            if c > keep:
                chars.append(c - keep)
                nbytes.append(b)
        self.anchor_chars, self.anchor_bytes = chars, nbytes
        self.buf = buf[keep:]
        self.ascii = self.buf.isascii()
        if self.pin is not None:
            self.pin -= keep
        self.cpos, self.cline, self.cnl = 0, self.base_line, -1

    def byte_at(self, p: int) -> int:
        """Byte offset in the file of window position ``p``."""
        k = bisect_right(self.anchor_chars, p) - 1
        c = self.anchor_chars[k]
        if self.ascii:
            return self.anchor_bytes[k] + p - c
        return self.anchor_bytes[k] + _utf8_len(self.buf[c:p])

    def line_col(self, p: int) -> tuple[int, int]:
        """(line, 0-based column) of window position ``p``; cheap for increasing ``p``."""
        if p < self.cpos:
            self.cpos, self.cline, self.cnl = 0, self.base_line, -1
        buf = self.buf
        n = buf.count("\n", self.cpos, p)
        if n:
            self.cline += n
            self.cnl = buf.rfind("\n", self.cpos, p)
        self.cpos = p
        col = p - self.cnl - 1 if self.cnl >= 0 else self.base_col + p
        return self.cline, col

    def where(self, p: int) -> Where:
        """(line, 0-based column, byte offset) of window position ``p``."""
        line, col = self.line_col(p)
        return line, col, self.byte_at(p)

    def skip(self, p: int) -> int | None:
        """Skip whitespace from ``p`` (may drop text); None at end of file."""
        while True:
            p = _json.skip_ws(self.buf, p)
            if p < len(self.buf):
                return p
            p = self.ensure(p, 1)
            if p >= len(self.buf):
                return None

    def decode(self, p: int) -> tuple[Any, int]:
        """Parse the value at ``p``, growing the window as needed; raise _Malformed."""
        limit = self.e.max_record_bytes
        while True:
            try:
                return _json.raw_decode(self.buf, p)
            except JSONDecodeError as err:
                if not self.eof and (err.pos >= len(self.buf) - 64 or err.msg.startswith("Unterminated string")):
                    if len(self.buf) - p > limit:
                        raise _TooLarge from None
                    self.grow(p, len(self.buf) - p + self.CHUNK)
                    continue
                raise _Malformed(err.pos, err.msg) from None
            except JSONConstantError as err:
                at = _constant_position(self.buf, p, err.name)
                raise _Malformed(at, f"{err.name} is not valid JSON") from None
            except RecursionError:
                raise _Malformed(p, "nested too deeply") from None

    def key(self, p: int) -> tuple[str, int]:
        """Parse the object key (a string) at ``p``, growing the window as needed."""
        while True:
            try:
                return _json.scanstring(self.buf, p + 1)
            except ValueError as err:
                if not self.eof and len(self.buf) - p <= self.e.max_record_bytes:
                    self.grow(p, len(self.buf) - p + self.CHUNK)
                    continue
                pos = err.pos if isinstance(err, JSONDecodeError) else p
                raise _Malformed(pos, err.msg if isinstance(err, JSONDecodeError) else str(err)) from None

    # -- structure ------------------------------------------------------------------

    def run(self) -> Gen:
        try:
            p = self.skip(0)
            if p is not None:
                ch = self.buf[p]
                if ch == "[":
                    end = yield from self.array(p)
                    self.trailing(end)
                elif ch == "{":
                    yield from self.top_object(p)
                else:
                    self.malformed(
                        p,
                        "a conversations document starts with '[' or '{'",
                        'Write the file as {"conversations": [...]} or one conversation per line.',
                    )
        finally:
            self.e.res.records = self.index + 1
            self.e.res.records_with_errors = self.with_errors

    def ref(self, p: int) -> Ref:
        line, col = self.line_col(p)
        return (self.buf, p, line, None, col)

    def malformed(
        self,
        pos: int,
        msg: str,
        fix: str | None = None,
        index: int | None = None,
        loc: Where | None = None,
    ) -> None:
        line, col, byte = loc if loc is not None else self.where(pos)
        if fix is None:
            if msg.endswith("is not valid JSON"):
                fix = "Use null or a finite number; NaN and Infinity are not JSON."
            elif msg == "nested too deeply":
                fix = "Flatten the structure; nesting this deep is never a dataset record."
            else:
                fix = _json.malformed_fix(msg, self.buf, pos, jsonl=False)
        near = "" if loc is not None else _snippet(self.buf, pos)
        self.e.emit(
            IssueType.MALFORMED_JSON,
            _CRIT,
            f"malformed JSON: {msg}",
            None,
            index=index,
            where=(line, col + 1, byte),
            expected="valid JSON",
            found=near or ("end of file" if pos >= len(self.buf) else None),
            fix=fix,
        )

    def element(self, p: int) -> GenPos:
        """Check the conversation at ``p``; return the position after it (or after a resync)."""
        p = self.ensure(p)
        self.index += 1
        index = self.index
        mark = self.e.n_critical
        try:
            obj, end = self.decode(p)
        except _Malformed as m:
            self.malformed(m.pos, m.msg, index=index)
            self.with_errors += 1
            self.resynced = True
            return self.resync(max(m.pos, p + 1))
        except _TooLarge:
            line, col, byte = self.where(p)
            self.e.emit(
                IssueType.RECORD_TOO_LARGE,
                _CRIT,
                f"conversation is larger than the {self.e.max_record_bytes}-byte limit",
                None,
                index=index,
                where=(line, col + 1, byte),
                expected=f"<= {self.e.max_record_bytes} bytes",
                found="larger",
                fix="Split the conversation or remove it.",
            )
            self.with_errors += 1
            self.resynced = True
            return self.resync(p + 1)
        if end - p > self.e.max_record_bytes:
            line, col, byte = self.where(p)
            self.e.emit(
                IssueType.RECORD_TOO_LARGE,
                _CRIT,
                f"conversation is {end - p} characters, above the {self.e.max_record_bytes}-byte limit",
                None,
                index=index,
                where=(line, col + 1, byte),
                expected=f"<= {self.e.max_record_bytes} bytes",
                found=f"{end - p} characters",
                fix="Split the conversation or remove it.",
            )
            self.with_errors += 1
            yield
            return end
        ref = self.ref(p)
        if _suspect_text(self.buf, p, end):
            self.e._check_strings(obj, ref, index, escaped_bytes=self.e.encoding_errors > 0)
        self.e.check_conversation(obj, index, ref, mark)
        if self.e.n_critical != mark:
            self.with_errors += 1
        yield
        return end

    def resync(self, p: int) -> int | None:
        """Position of the next object that parses as a conversation, or None."""
        while True:
            p = self.ensure(p)
            k = self.buf.find("{", p)
            if k < 0:
                if self.eof:
                    return None
                p = len(self.buf)
                continue
            k = self.ensure(k, max(self.LOOKAHEAD, 4096))  # room for the regex below
            if _CONVERSATION_START.match(self.buf, k):
                return k  # reported in its own right, even if it does not parse
            try:
                obj, end = self.decode(k)
            except (_Malformed, _TooLarge):
                p = k + 1
                continue
            if isinstance(obj, dict) and ("training_pairs" in obj or "conversation_id" in obj):
                return k
            p = end

    def array(self, p: int) -> GenPos:
        """Stream the conversations array opening at ``p``; return the position after it."""
        open_loc = self.where(p)
        q = self.skip(p + 1)
        if q is None:
            self.malformed(len(self.buf), "the conversations array is not closed")
            return None
        if self.buf[q] == "]":
            line, col, byte = open_loc
            self.e.emit(
                IssueType.EMPTY_ARRAY,
                _CRIT,
                "'conversations' is empty",
                None,
                ("conversations",),
                where=(line, col + 1, byte),
                expected="at least one conversation",
                found="empty array",
                fix="Add conversations to the file.",
            )
            return q + 1
        while True:
            self.resynced = False
            r = yield from self.element(q)
            if r is None:
                return None
            if self.resynced:  # r is the start of the next conversation
                q = r
                continue
            q = self.skip(r)
            if q is None:
                self.malformed(len(self.buf), "unexpected end of file: the array is not closed")
                return None
            ch = self.buf[q]
            if ch == ",":
                q = self.skip(q + 1)
                if q is None:
                    self.malformed(len(self.buf), "unexpected end of file after ','")
                    return None
                if self.buf[q] == "]":
                    # At the bracket, as the parser reports trailing commas inside values.
                    self.malformed(q, "trailing comma before ']'", "Remove the trailing comma before ']'.")
                    return q + 1
                continue
            if ch == "]":
                return q + 1
            self.malformed(q, "Expecting ',' delimiter")
            if ch != "{":
                r = self.resync(q + 1)
                if r is None:
                    return None
                q = r

    def trailing(self, p: int | None) -> None:
        if p is None:
            return
        q = self.skip(p)
        if q is not None:
            self.malformed(q, "Extra data", "Remove the text after the end of the JSON document.")

    def top_object(self, p: int) -> Gen:
        """A wrapper ``{"conversations": [...], ...}`` or a first conversation object."""
        self.pin = p
        q = self.skip(p + 1)
        wrapper = False
        members: dict[str, Any] = {}
        try:
            while q is not None:
                q = self.ensure(q)
                ch = self.buf[q]
                if ch == "}" and not members and not wrapper:
                    q += 1
                    break
                if ch != '"':
                    raise _Malformed(q, "Expecting property name enclosed in double quotes")
                key, q = self.key(q)
                q = self.skip(q)
                if q is None or self.buf[q] != ":":
                    raise _Malformed(len(self.buf) if q is None else q, "Expecting ':' delimiter")
                q = self.skip(q + 1)
                if q is None:
                    raise _Malformed(len(self.buf), "Expecting value")
                if key == "conversations" and "training_pairs" not in members:
                    wrapper = True
                    self.pin = None
                    self._document_metadata(members)
                    if self.buf[q] == "[":
                        r = yield from self.array(q)
                        if r is None:
                            return
                        q = r
                    else:
                        loc = self.where(q)
                        value, q = self.decode(q)
                        self.e.emit(
                            IssueType.INVALID_DATA_TYPE,
                            _CRIT,
                            f"'conversations' must be an array, found {json_type(value)}",
                            None,
                            ("conversations",),
                            where=(loc[0], loc[1] + 1, loc[2]),
                            expected="array of conversations",
                            found=describe(value),
                            fix='Write the conversations as a JSON array: {"conversations": [...]}.',
                        )
                else:
                    value, q = self.decode(q)
                    members[key] = value
                q = self.skip(q)
                if q is None:
                    raise _Malformed(len(self.buf), "Expecting ',' delimiter")
                if self.buf[q] == ",":
                    q = self.skip(q + 1)
                    continue
                if self.buf[q] == "}":
                    q += 1
                    break
                raise _Malformed(q, "Expecting ',' delimiter")
        except _Malformed as m:
            start = self.pin if self.pin is not None else 0
            self.pin = None
            if wrapper:
                self.malformed(m.pos, m.msg)
                return
            # A broken first conversation: report it, resynchronise, go on.
            self.index += 1
            self.malformed(m.pos, m.msg, index=self.index)
            self.with_errors += 1
            yield from self.sequence(self.resync(max(m.pos, start + 1)))
            return
        except _TooLarge:
            start = self.pin if self.pin is not None else 0
            self.pin = None
            self.malformed(start, "object larger than the record size limit")
            return
        if wrapper:
            self._document_metadata(members)
            self.trailing(q)
            return
        start = self.pin if self.pin is not None else 0
        ref = self.ref(start)
        self.pin = None
        if "training_pairs" not in members and "conversation_id" not in members:
            line, col, byte = self.where(start)
            self.e.emit(
                IssueType.MISSING_REQUIRED_FIELD,
                _CRIT,
                "missing required field 'conversations'",
                None,
                ("conversations",),
                where=(line, col + 1, byte),
                expected="array of conversations",
                found=f"object with keys {', '.join(clip(k, 24) for k in list(members)[:5])}"
                if members
                else "empty object",
                fix='Put the conversations in a "conversations" array: {"conversations": [...]}.',
            )
            self.trailing(q)
            return
        # The object was a conversation: check it, then read more conversations.
        self.index += 1
        mark = self.e.n_critical
        self.e.check_conversation(members, self.index, ref, mark)
        if self.e.n_critical != mark:
            self.with_errors += 1
        yield
        yield from self.sequence(q)

    def _document_metadata(self, members: dict[str, Any]) -> None:
        res = self.e.res
        meta: dict[str, Any] = {k: v for k, v in members.items() if k not in _DOC_META_KEYS}
        for key in _DOC_META_KEYS:
            sub = members.get(key)
            if isinstance(sub, dict):
                meta.update(sub)
        version = meta.get("format_version")
        if isinstance(version, str):
            res.format_version = version
        rating = meta.get("quality_score")
        if rating is not None:
            res.dataset_rating = self.e._rating(rating, None, ("quality_score",), None, None)

    def sequence(self, p: int | None) -> Gen:
        """Conversations one after another (JSON Lines, pretty or not)."""
        while p is not None:
            q = self.skip(p)
            if q is None:
                return
            if self.buf[q] == ",":
                self.malformed(q, "unexpected ',' between top-level values")
                p = q + 1
                continue
            p = yield from self.element(q)


def _safe_cut(data: bytes | memoryview) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:
            return n
        if b >= 0xC0:  # a lead byte: is its sequence complete?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n if back >= need else n - back
    return n
