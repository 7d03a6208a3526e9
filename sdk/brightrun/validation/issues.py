"""Issue records: what a validation finds, where, and how to fix it.

An issue is one problem at one place. Every record carries:

* ``type`` — one of :class:`IssueType` (stable snake_case identifiers);
* ``severity`` — ``critical`` (the trainer cannot use the data as it is; any
  critical issue blocks job creation) or ``warning`` (training works, but the
  data is probably not what was meant);
* ``conversation_index`` — 0-based index of the record: the line's ordinal among
  non-blank lines for JSON Lines, the element of ``conversations`` for documents.
  User-facing text numbers conversations from 1 ("Conversation #47" is
  ``conversations[46]``);
* ``conversation_id`` — ``conversation_id`` (conversations format) or ``id``
  (JSON Lines formats) when the record has one;
* ``pair_index`` — index within ``training_pairs`` (conversations format);
* ``path`` — the field path, 0-based indices:
  ``conversations[46].training_pairs[0].target_response`` for the conversations
  format (JSON document or JSON Lines alike), ``[12].messages[3].content`` for
  chat JSONL and ``[12].output`` for instruction JSONL; file-level issues (a BOM,
  an empty file) have the path ``""``;
* ``line`` (1-based), ``column`` (1-based, in characters) and ``byte_offset``
  (0-based, from the start of the file) of the offending value, or of the object
  that lacks a required field;
* ``message``, ``expected`` and ``found`` (short human strings), and
  ``suggested_fix``.

The context excerpt (up to 10 lines either side, offending line marked) is built
on demand from the file by :func:`brightrun.validation.context.context_excerpt`
(or :meth:`ValidationReport.context`), so a report never holds file contents.

Severities by type (see :data:`ISSUE_CATALOG`):

========================  ========================================================
type                      severity
========================  ========================================================
malformed_json            critical
encoding_error            critical; warning for a UTF-8 BOM and for ``\\u0000``
                          escapes inside strings
missing_required_field    critical
missing_id                warning (``conversation_id`` absent: ids only serve
                          reports and duplicate detection)
invalid_data_type         critical for fields the trainer reads; warning for
                          optional ones (``weight``, ``scaffolding_metadata``,
                          ``quality_score``, ``conversation_id``)
invalid_value             warning (negative or non-finite ``weight``, a
                          ``quality_score`` outside 0 to 5)
empty_array               critical
empty_content             critical for what the model learns (assistant turns,
                          ``target_response``, ``output``); warning for prompts
unknown_role              critical
no_final_assistant        critical when a conversation has no assistant turn;
                          warning when it ends with another role after one
duplicate_id              critical
duplicate_content         warning
record_too_large          critical (a line or conversation above the size limit)
token_length_exceeded     warning (the example is truncated to ``max_seq_len``)
all_labels_masked         critical (no target token survives truncation)
template_error            critical (the chat template refuses the example)
template_drops_content    warning (the rendered template lacks a message)
internal_error            critical (a validator bug; never expected)
========================  ========================================================
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal


class Severity(StrEnum):
    """How bad an issue is; critical issues block job creation."""

    CRITICAL = "critical"
    WARNING = "warning"


class IssueType(StrEnum):
    """Stable identifiers of the problems validation reports."""

    MALFORMED_JSON = "malformed_json"
    ENCODING_ERROR = "encoding_error"
    MISSING_REQUIRED_FIELD = "missing_required_field"
    MISSING_ID = "missing_id"
    INVALID_DATA_TYPE = "invalid_data_type"
    INVALID_VALUE = "invalid_value"
    EMPTY_ARRAY = "empty_array"
    EMPTY_CONTENT = "empty_content"
    UNKNOWN_ROLE = "unknown_role"
    NO_FINAL_ASSISTANT = "no_final_assistant"
    DUPLICATE_ID = "duplicate_id"
    DUPLICATE_CONTENT = "duplicate_content"
    RECORD_TOO_LARGE = "record_too_large"
    TOKEN_LENGTH_EXCEEDED = "token_length_exceeded"
    ALL_LABELS_MASKED = "all_labels_masked"
    TEMPLATE_ERROR = "template_error"
    TEMPLATE_DROPS_CONTENT = "template_drops_content"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class IssueKind:
    """Catalog entry: a title, the usual severity and the generic fix of a type."""

    title: str
    severity: Severity
    fix: str
    rule: str


#: One entry per issue type; the per-issue ``suggested_fix`` refines ``fix``.
ISSUE_CATALOG: dict[IssueType, IssueKind] = {
    IssueType.MALFORMED_JSON: IssueKind(
        "Malformed JSON",
        Severity.CRITICAL,
        "Fix the JSON syntax at the marked position.",
        "Every line (JSON Lines) or the whole document parses as JSON.",
    ),
    IssueType.ENCODING_ERROR: IssueKind(
        "Encoding error",
        Severity.CRITICAL,
        "Save the file as UTF-8 without a byte order mark.",
        "The file is UTF-8 text without NUL bytes or unpaired surrogates.",
    ),
    IssueType.MISSING_REQUIRED_FIELD: IssueKind(
        "Missing required field",
        Severity.CRITICAL,
        "Add the field with a non-empty value.",
        "Field exists and has a non-null value.",
    ),
    IssueType.MISSING_ID: IssueKind(
        "Missing conversation id",
        Severity.WARNING,
        "Give every conversation a unique conversation_id.",
        "Every conversation has a conversation_id.",
    ),
    IssueType.INVALID_DATA_TYPE: IssueKind(
        "Invalid data type",
        Severity.CRITICAL,
        "Change the value to the expected type.",
        "Field values have the documented JSON type.",
    ),
    IssueType.INVALID_VALUE: IssueKind(
        "Invalid value",
        Severity.WARNING,
        "Change the value to one inside the allowed range.",
        "Numeric fields are finite and inside their range.",
    ),
    IssueType.EMPTY_ARRAY: IssueKind(
        "Empty array",
        Severity.CRITICAL,
        "Add at least one element, or remove the record.",
        "Arrays of messages, training pairs and conversations are non-empty.",
    ),
    IssueType.EMPTY_CONTENT: IssueKind(
        "Empty content",
        Severity.CRITICAL,
        "Write the text, or remove the record.",
        "Message texts are non-empty and not only whitespace.",
    ),
    IssueType.UNKNOWN_ROLE: IssueKind(
        "Unknown role",
        Severity.CRITICAL,
        "Use one of the roles system, user, assistant.",
        "Every message role is system, user or assistant.",
    ),
    IssueType.NO_FINAL_ASSISTANT: IssueKind(
        "No final assistant turn",
        Severity.CRITICAL,
        "End the conversation with the assistant reply the model should learn.",
        "A conversation ends with an assistant turn.",
    ),
    IssueType.DUPLICATE_ID: IssueKind(
        "Duplicate ID",
        Severity.CRITICAL,
        "Give each conversation its own id, or remove the duplicate.",
        "Conversation ids are unique within the file.",
    ),
    IssueType.DUPLICATE_CONTENT: IssueKind(
        "Duplicate content",
        Severity.WARNING,
        "Remove the repeated example; duplicates over-weight it in training.",
        "No two examples have the same messages.",
    ),
    IssueType.RECORD_TOO_LARGE: IssueKind(
        "Record too large",
        Severity.CRITICAL,
        "Split the record; one line or conversation must stay below the size limit.",
        "Each line / conversation is below the record size limit.",
    ),
    IssueType.TOKEN_LENGTH_EXCEEDED: IssueKind(
        "Token length exceeded",
        Severity.WARNING,
        "Shorten the example or raise max_seq_len; the end is cut off in training.",
        "Each example fits in max_seq_len tokens with the chat template.",
    ),
    IssueType.ALL_LABELS_MASKED: IssueKind(
        "All labels masked",
        Severity.CRITICAL,
        "Shorten the prompt or raise max_seq_len so the reply fits.",
        "Each example keeps at least one assistant token after truncation.",
    ),
    IssueType.TEMPLATE_ERROR: IssueKind(
        "Chat template error",
        Severity.CRITICAL,
        "Reorder or merge the messages so the model's chat template accepts them.",
        "The base model's chat template renders every example.",
    ),
    IssueType.TEMPLATE_DROPS_CONTENT: IssueKind(
        "Template drops content",
        Severity.WARNING,
        "Move the text into a message the chat template keeps (often: merge the "
        "system prompt into the first user message).",
        "Every message text appears in the rendered chat template.",
    ),
    IssueType.INTERNAL_ERROR: IssueKind(
        "Internal validator error",
        Severity.CRITICAL,
        "Report this to the BrightRun maintainers with the file if you can.",
        "The validator never fails.",
    ),
}


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    """One problem found in a dataset, pinned to its place (see the module doc)."""

    type: str
    severity: str  # "critical" | "warning"
    message: str
    path: str = ""
    line: int | None = None
    column: int | None = None
    byte_offset: int | None = None
    conversation_index: int | None = None
    conversation_id: str | None = None
    pair_index: int | None = None
    expected: str | None = None
    found: str | None = None
    suggested_fix: str | None = None

    @property
    def is_critical(self) -> bool:
        return self.severity == Severity.CRITICAL

    def where(self) -> str:
        """``Conversation #47 (ID: conv_abc123)`` or ``File`` for file-level issues."""
        if self.conversation_index is None:
            return "File"
        text = f"Conversation #{self.conversation_index + 1}"
        if self.conversation_id:
            text += f" (ID: {self.conversation_id})"
        return text

    def headline(self) -> str:
        """One line for lists: ``Conversation #47 (ID: x): message``."""
        return f"{self.where()}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# Sorting, filtering, paging, CSV — shared by the CLI and the server.

SortKey = Literal["index", "type", "severity"]
_SEVERITY_RANK = {Severity.CRITICAL.value: 0, Severity.WARNING.value: 1}


def _index_key(issue: ValidationIssue) -> tuple[int, int, int, int]:
    return (
        -1 if issue.conversation_index is None else issue.conversation_index,
        -1 if issue.pair_index is None else issue.pair_index,
        issue.line or 0,
        issue.column or 0,
    )


def sort_issues(issues: Iterable[ValidationIssue], by: SortKey = "index") -> list[ValidationIssue]:
    """Order issues by conversation index, by type, or by severity (critical first).

    Ties keep file order (conversation index, pair, line, column); the sort is stable.
    """
    items = list(issues)
    if by == "index":
        return sorted(items, key=_index_key)
    if by == "type":
        return sorted(items, key=lambda i: (i.type, _index_key(i)))
    if by == "severity":
        return sorted(items, key=lambda i: (_SEVERITY_RANK.get(i.severity, 2), _index_key(i)))
    raise ValueError(f"unknown sort key {by!r}; expected index, type or severity")


def filter_issues(
    issues: Iterable[ValidationIssue],
    *,
    critical_only: bool = False,
    types: Iterable[str] | None = None,
) -> list[ValidationIssue]:
    """Keep critical issues only and/or only the given types."""
    wanted = set(types) if types is not None else None
    return [
        i
        for i in issues
        if (not critical_only or i.severity == Severity.CRITICAL) and (wanted is None or i.type in wanted)
    ]


@dataclass(frozen=True, slots=True)
class IssuePage:
    """One page of issues; ``next_page_token`` is empty on the last page."""

    issues: list[ValidationIssue]
    next_page_token: str
    total: int


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if not raw.startswith("o:"):
            raise ValueError
        offset = int(raw[2:])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"invalid page token {token!r}") from e
    if offset < 0:
        raise ValueError(f"invalid page token {token!r}")
    return offset


def page_issues(issues: Sequence[ValidationIssue], *, page_size: int = 25, page_token: str = "") -> IssuePage:
    """Cut an (already sorted and filtered) sequence into pages.

    ``page_token`` is opaque; pass the previous page's ``next_page_token``. A page
    size of 0 or less means the default, 25 (the seeds' page size); at most 1000.
    """
    size = 25 if page_size <= 0 else min(page_size, 1000)
    start = _decode_token(page_token) if page_token else 0
    end = start + size
    return IssuePage(
        issues=list(issues[start:end]),
        next_page_token=_encode_token(end) if end < len(issues) else "",
        total=len(issues),
    )


#: Columns of :func:`issues_to_csv`, in order.
CSV_COLUMNS = (
    "conversation_number",
    "conversation_index",
    "conversation_id",
    "pair_index",
    "type",
    "severity",
    "path",
    "line",
    "column",
    "byte_offset",
    "message",
    "expected",
    "found",
    "suggested_fix",
)


def issues_to_csv(issues: Iterable[ValidationIssue], *, header: bool = True) -> Iterator[str]:
    """Yield CSV lines (each ending in ``\\r\\n``, RFC 4180), the header first.

    A generator, so a server can stream the export without building it in memory.
    ``conversation_number`` is the 1-based number shown to people.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def flush() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    if header:
        writer.writerow(CSV_COLUMNS)
        yield flush()
    for i in issues:
        number = "" if i.conversation_index is None else i.conversation_index + 1
        writer.writerow(
            [
                number,
                _blank(i.conversation_index),
                _blank(i.conversation_id),
                _blank(i.pair_index),
                i.type,
                i.severity,
                i.path,
                _blank(i.line),
                _blank(i.column),
                _blank(i.byte_offset),
                i.message,
                _blank(i.expected),
                _blank(i.found),
                _blank(i.suggested_fix),
            ]
        )
        yield flush()


def _blank(value: object) -> object:
    return "" if value is None else value
