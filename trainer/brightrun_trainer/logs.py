"""Attempt logging: ``trainer.log`` plus a tail kept in memory for failure reports.

Dataset text never goes to the log unless ``debug_log_data`` is on; as a second
line of defence, :func:`redact` removes long quoted strings (the usual way an
exception message quotes data) from exception messages and log tails.
"""

from __future__ import annotations

import logging
import re
import sys
from collections import deque
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TAIL_LINES = 50
#: Quoted strings at least this long are redacted from failure text.
REDACT_MIN_CHARS = 24
_QUOTED = re.compile(r"(?P<q>['\"])(?P<body>(?:(?!(?P=q)).){" + str(REDACT_MIN_CHARS) + r",})(?P=q)", re.DOTALL)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Replace long quoted prose (and any of ``secrets``) with a placeholder."""
    for secret in secrets:
        if len(secret) >= 8:
            text = text.replace(secret, f"<redacted {len(secret)} chars>")

    def replace(m: re.Match[str]) -> str:
        body = m["body"]
        if not any(c.isspace() for c in body):
            return m[0]  # a path, identifier or hash rather than prose
        return f"{m['q']}<redacted {len(body)} chars>{m['q']}"

    return _QUOTED.sub(replace, text)


class TailHandler(logging.Handler):
    """Keeps the last formatted lines in memory."""

    def __init__(self, lines: int = TAIL_LINES) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines():
                self.lines.append(line)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)

    def tail(self) -> tuple[str, ...]:
        return tuple(redact(line) for line in self.lines)


def setup_logging(log_path: Path, *, verbose: bool = False) -> TailHandler:
    """Route the root logger to ``log_path``, stderr and an in-memory tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    stderr_handler = logging.StreamHandler(sys.stderr)
    tail = TailHandler()
    for handler in (file_handler, stderr_handler, tail):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.captureWarnings(True)
    for noisy in ("urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return tail
