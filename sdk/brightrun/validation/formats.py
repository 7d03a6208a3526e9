"""Dataset formats and their one normalised form.

Every supported file becomes a stream of :class:`Example` objects: a list of
chat messages (roles ``system`` / ``user`` / ``assistant``) plus where the
example came from. The trainer only ever sees this form.

Formats:

* ``chat_jsonl``: one ``{"messages": [{"role": ..., "content": ...}, ...]}``
  object per line, optional ``weight``.
* ``conversations``: the seeds' format; conversations with ``conversation_id``
  and ``training_pairs[]`` of ``prompt_context`` / ``user_query`` /
  ``target_response`` / ``scaffolding_metadata``. Either a JSON document
  (``{"conversations": [...]}`` or a top-level array) or JSON Lines with one
  conversation per line. Each training pair becomes one example:
  system = ``prompt_context`` (when non-empty), user = ``user_query``,
  assistant = ``target_response``.
* ``instruction_jsonl``: one ``{"instruction", "input", "output"}`` object per
  line; user = instruction (+ blank line + input when non-empty),
  assistant = output.

Optional fields validation reads: ``weight`` (chat / instruction: a number >= 0,
default 1.0) and ``id`` (any JSON Lines record: unique, used in reports) per
record; in the conversations format ``quality_score`` per conversation (the
seeds' 0-5 rating), ``scaffolding_metadata`` on a conversation (the default for
its pairs), and in a ``{"conversations": [...]}`` document ``dataset_metadata``
with ``format_version`` and ``quality_score``. Other keys are ignored.

:func:`iter_examples` streams a file through the validation engine in strict
mode: it yields the examples of a valid file and raises
:class:`DatasetFormatError` at the first critical problem (the same problems
:func:`brightrun.validation.validate_file` reports as critical, minus the
tokenizer checks). Warnings never stop it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class DatasetFormat(StrEnum):
    """On-disk layout of a training file; values are stable identifiers."""

    CHAT_JSONL = "chat_jsonl"
    CONVERSATIONS = "conversations"
    INSTRUCTION_JSONL = "instruction_jsonl"


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Example:
    """One training example in normalised form."""

    messages: tuple[Message, ...]
    #: Index of the conversation (line for JSON Lines, element for documents).
    index: int
    #: ``conversation_id`` where the format has one.
    conversation_id: str | None = None
    #: Index within ``training_pairs`` for the conversations format.
    pair_index: int | None = None
    #: Loss weight of the example; 1.0 unless the file says otherwise.
    weight: float = 1.0
    #: Scaffolding metadata (persona, emotional_arc, topic) where present.
    metadata: dict[str, str] = field(default_factory=dict)


class DatasetFormatError(ValueError):
    """A file cannot be read as the requested format.

    ``path`` is the field path of the problem (``conversations[3].training_pairs[0]``),
    ``line`` the 1-based line where it is.
    """

    def __init__(self, message: str, *, path: str = "", line: int | None = None) -> None:
        where = " ".join(p for p in (f"line {line}" if line else "", path) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.line = line


_CONVERSATION_KEYS = ("training_pairs", "conversations", "conversation_id")
_INSTRUCTION_KEYS = ("instruction", "output")


def _classify(obj: object) -> DatasetFormat | None:
    if not isinstance(obj, dict):
        return None
    if any(k in obj for k in _CONVERSATION_KEYS):
        return DatasetFormat.CONVERSATIONS
    if "messages" in obj:
        return DatasetFormat.CHAT_JSONL
    if any(k in obj for k in _INSTRUCTION_KEYS):
        return DatasetFormat.INSTRUCTION_JSONL
    return None


def detect_format_bytes(head: bytes) -> DatasetFormat:
    """Guess the format from the first bytes of a file (never raises)."""
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    if text.startswith("["):
        return DatasetFormat.CONVERSATIONS
    if re.match(r'\{\s*"(conversations|training_pairs|conversation_id|dataset_metadata)"', text):
        return DatasetFormat.CONVERSATIONS
    lines = text.split("\n", 21)[:20]
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        found = _classify(obj)
        if found is not None:
            return found
    # No line parsed on its own: look at the keys in the text.
    if '"training_pairs"' in text or '"conversations"' in text:
        return DatasetFormat.CONVERSATIONS
    if '"messages"' in text:
        return DatasetFormat.CHAT_JSONL
    if '"instruction"' in text or '"output"' in text:
        return DatasetFormat.INSTRUCTION_JSONL
    return DatasetFormat.CHAT_JSONL


def detect_format(path: str | Path, *, sniff_bytes: int = 1 << 16) -> DatasetFormat:
    """Guess the format from the first lines of the file (chat JSONL when unsure)."""
    with open(path, "rb") as f:
        head = f.read(sniff_bytes)
    return detect_format_bytes(head)


def iter_examples(path: str | Path, fmt: DatasetFormat | str | None = None) -> Iterator[Example]:
    """Yield the examples of a file in order; raise DatasetFormatError on bad input.

    Streams: memory stays bounded by the largest record. The error names the
    field path and line of the first critical problem.
    """
    from brightrun.validation._engine import Engine

    resolved = DatasetFormat(fmt) if fmt else detect_format(path)
    pending: list[Example] = []
    engine = Engine(resolved, strict=True, on_example=pending.append)
    with open(path, "rb") as f:
        yield from engine.iter_run(f, pending)
