"""Context excerpts: the lines around an issue, read from the file on demand.

Reports hold positions, never file contents; an excerpt reads a bounded window
(at most ``window`` bytes either side of the issue) so it stays cheap on a
gigabyte file or a file that is one enormous line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Longest line shown in full; longer ones are clipped around the issue's column.
MAX_LINE_CHARS = 200


@dataclass(frozen=True, slots=True)
class ExcerptLine:
    number: int
    text: str
    marked: bool
    clipped: bool


@dataclass(frozen=True, slots=True)
class ContextExcerpt:
    """Lines around an issue; the offending one has ``marked=True``.

    ``caret`` is the 0-based character position of the issue within the marked
    line's displayed ``text`` (after clipping), or None.
    """

    lines: tuple[ExcerptLine, ...]
    caret: int | None

    def render(self, *, marker: str = ">>") -> str:
        """Plain text, the offending line prefixed with ``>>`` and a caret under it."""
        if not self.lines:
            return ""
        width = len(str(self.lines[-1].number))
        pad = " " * len(marker)
        out: list[str] = []
        for line in self.lines:
            prefix = marker if line.marked else pad
            out.append(f"{prefix} {line.number:>{width}} | {line.text}")
            if line.marked and self.caret is not None:
                out.append(f"{pad} {' ' * width} | {' ' * self.caret}^")
        return "\n".join(out)

    def to_dict(self) -> dict[str, object]:
        return {
            "lines": [
                {"number": x.number, "text": x.text, "marked": x.marked, "clipped": x.clipped} for x in self.lines
            ],
            "caret": self.caret,
        }


def _clip(text: str, column: int | None, limit: int) -> tuple[str, int | None, bool]:
    """Clip ``text`` to ``limit`` chars keeping ``column`` (0-based) visible."""
    if len(text) <= limit:
        return text, column, False
    if column is None or column < limit - 20:
        return text[: limit - 1] + "…", column, True
    start = max(0, column - limit // 3)
    end = start + limit - 2
    piece = "…" + text[start:end] + ("…" if end < len(text) else "")
    return piece, column - start + 1, True


def context_excerpt(
    path: str | Path,
    *,
    byte_offset: int,
    line: int,
    column: int | None = None,
    before: int = 10,
    after: int = 10,
    window: int = 64 * 1024,
    max_line_chars: int = MAX_LINE_CHARS,
) -> ContextExcerpt:
    """Read up to ``before`` / ``after`` lines around ``byte_offset`` (on ``line``).

    ``column`` is the issue's 1-based character column; it places the caret and
    keeps the issue visible when the line is clipped. Lines cut by the read
    window or longer than ``max_line_chars`` are clipped (``clipped=True``).
    """
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        start = max(0, byte_offset - window)
        f.seek(start)
        data = f.read(byte_offset - start + window)
    window_ends_early = start + len(data) < size
    rel = min(byte_offset - start, len(data))
    line_start = data.rfind(b"\n", 0, rel) + 1
    head_cut = line_start == 0 and start > 0
    line_end = data.find(b"\n", rel)
    tail_cut = line_end < 0 and window_ends_early
    if line_end < 0:
        line_end = len(data)

    # Lines before: walk back over at most `before` newlines.
    prev: list[tuple[bytes, str]] = []
    cursor = line_start - 1  # index of the newline that ends the previous line
    while len(prev) < before and cursor >= 0:
        begin = data.rfind(b"\n", 0, cursor) + 1
        prev.append((data[begin:cursor], "head" if begin == 0 and start > 0 else ""))
        if begin == 0:
            break
        cursor = begin - 1
    prev.reverse()

    # Lines after.
    nxt: list[tuple[bytes, str]] = []
    cursor = line_end + 1
    while len(nxt) < after and cursor <= len(data):
        end = data.find(b"\n", cursor)
        if end < 0:
            if cursor < len(data) or window_ends_early:
                nxt.append((data[cursor:], "tail" if window_ends_early else ""))
            break
        nxt.append((data[cursor:end], ""))
        cursor = end + 1

    lines: list[ExcerptLine] = []
    first = line - len(prev)
    for k, (raw, cut) in enumerate(prev):
        lines.append(_make_line(first + k, raw, cut, max_line_chars))
    marked_text = data[line_start:line_end].decode("utf-8", "replace").rstrip("\r")
    # The place in the (possibly cut) line, from bytes: right even when the
    # window starts in the middle of a huge line. `column` confirms it when given.
    caret: int | None = len(data[line_start:rel].decode("utf-8", "replace"))
    if column is None and not head_cut and rel == line_start:
        caret = None
    text, caret, clipped = _clip(marked_text, caret, max_line_chars)
    if head_cut:
        text = "…" + text
        caret = None if caret is None else caret + 1
    if tail_cut and not text.endswith("…"):
        text += "…"
    if caret is not None and caret > len(text):
        caret = None
    lines.append(ExcerptLine(line, text, True, clipped or head_cut or tail_cut))
    for k, (raw, cut) in enumerate(nxt):
        lines.append(_make_line(line + 1 + k, raw, cut, max_line_chars))
    return ContextExcerpt(tuple(lines), caret)


def _make_line(number: int, raw: bytes, cut: str, limit: int) -> ExcerptLine:
    """``cut`` is "head" or "tail" when the read window cut the line there, else ""."""
    text = raw.decode("utf-8", "replace").rstrip("\r")
    text, _, clipped = _clip(text, None, limit)
    if cut == "head":
        text = "…" + text
    elif cut == "tail" and not text.endswith("…"):
        text += "…"
    return ExcerptLine(number, text, False, clipped or bool(cut))
