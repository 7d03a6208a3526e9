"""Shared pieces of the CLI: consoles, the global options, exit codes, error
lines and value formatting."""

from __future__ import annotations

import enum
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console

from brightrun.client import AsyncClient, Client
from brightrun.errors import ApiError, AuthenticationError, BrightRunError, UnavailableError


class ExitCode(enum.IntEnum):
    """Process exit codes. ``jobs wait`` uses all of them; other commands 0, 1 and 2.
    The numbers are stable: new ones are only ever added."""

    OK = 0
    #: The job failed (``jobs wait``), or a command failed.
    FAILED = 1
    #: Bad usage: unknown option, malformed value (typer's own code).
    USAGE = 2
    #: The job was cancelled.
    CANCELLED = 3
    #: ``--timeout`` passed before the job finished.
    TIMEOUT = 4
    #: The job completed but a ``--require`` gate did not hold.
    GATE = 5
    #: ``jobs wait`` could not follow the job (server unreachable, unknown job).
    ERROR = 6
    #: ``jobs wait``: the job awaits a decision (automatic recovery gave up).
    DECISION = 7


#: Width of tables and panels when stdout is not a terminal (logs, pipes, CI)
#: and COLUMNS is not set: wide enough that ids and names are not cut.
PIPE_WIDTH = 160


def stdout() -> Console:
    """A console on the current sys.stdout (looked up per call, so test runners
    that swap sys.stdout see the output)."""
    console = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = PIPE_WIDTH
    return console


def stderr() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


@dataclass
class Globals:
    """The global options, shared with every command through the typer context."""

    target: str | None = None
    api_key: str | None = None
    #: --tls / --no-tls; None: on when a certificate is given.
    tls: bool | None = None
    #: PEM files: the server's CA, and a client certificate and key (mutual TLS).
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    # An empty --api-key / BRIGHTRUN_API_KEY means "not given": the SDK then
    # falls back to BRIGHTRUN_API_KEY_FILE.
    def client(self) -> Client:
        return Client(self.target, api_key=self.api_key or None, **self.tls_options())

    def async_client(self) -> AsyncClient:
        return AsyncClient(self.target, api_key=self.api_key or None, **self.tls_options())

    def tls_options(self) -> dict[str, Any]:
        """The client's TLS arguments; --no-tls drops certificates set in the environment."""
        if self.tls is False:
            return {"tls": False}
        return {
            "tls": self.tls,
            "root_certificates": self.tls_ca or None,
            "client_cert": self.tls_cert or None,
            "client_key": self.tls_key or None,
        }


def globals_of(ctx: typer.Context) -> Globals:
    obj = ctx.find_object(Globals)
    return obj if obj is not None else Globals()


#: What to do about a key the server refused, in CLI terms.
_CLI_AUTH_HINTS = {
    "missing": (
        "pass --api-key, or set BRIGHTRUN_API_KEY or BRIGHTRUN_API_KEY_FILE (a fresh local server writes its "
        "first admin key to <data dir>/admin-api-key)"
    ),
    "invalid": (
        "check --api-key / BRIGHTRUN_API_KEY / BRIGHTRUN_API_KEY_FILE: keys look like brk_<id>_<secret> and work "
        "only on the server that made them (a fresh local server writes its first admin key to "
        "<data dir>/admin-api-key)"
    ),
}


def error_line(error: BaseException, target: str | None = None) -> str:
    """One line describing `error` for a terminal (field violations included)."""
    text = str(error) or type(error).__name__
    if isinstance(error, AuthenticationError):
        hint = _CLI_AUTH_HINTS.get(error.problem or "", error.hint)
        where = f" by the server at {target}" if target else ""
        text = f"API key refused{where}: {error.message} ({error.reason or error.code.name})"
        if hint:
            text += f"; {hint}"
    elif isinstance(error, UnavailableError) and error.reason is None:
        where = f" at {target}" if target else ""
        text = (
            f"cannot reach the BrightRun server{where}: {error.message} "
            "— is it running? (start one with `brightrun server`)"
        )
    elif isinstance(error, ApiError):
        pass
    elif isinstance(error, FileNotFoundError) and error.filename:
        text = f"no such file: {error.filename}"
    return text


def fail(message: str, code: int = ExitCode.FAILED) -> NoReturn:
    stderr().print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(int(code))


def report_error(error: BaseException, target: str | None = None, code: int = ExitCode.FAILED) -> NoReturn:
    fail(error_line(error, target), code)


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(text)


def print_json(value: Any) -> None:
    """Write JSON to stdout as plain text (no colour, no wrapping)."""
    if isinstance(value, BaseModel):
        value = to_jsonable(value)
    elif isinstance(value, list | tuple):
        value = [to_jsonable(v) if isinstance(v, BaseModel) else v for v in value]
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def to_jsonable(model: BaseModel) -> Any:
    return model.model_dump(mode="json")


# ------------------------------------------------------------------ formatting


def fmt_duration(value: timedelta | float | None) -> str:
    """``0:01:05`` style; ``-`` for None; sub-10 s values with a decimal."""
    if value is None:
        return "-"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(seconds):
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def fmt_usd(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return f"${value:.4f}"
    if value < 100:
        return f"${value:.2f}"
    return f"${value:,.0f}"


def fmt_float(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None else str(value)
    return f"{value:.{digits}f}"


def fmt_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "-"
    delta = (now or datetime.now(UTC)) - value
    seconds = delta.total_seconds()
    if seconds < 60:
        return f"{max(0, int(seconds))}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h ago"
    return f"{int(seconds // 86400)}d ago"


_DURATION = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>d|h|m|s)?", re.IGNORECASE)


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``2h``, ``1h30m``, ``1d`` → timedelta."""
    spec = text.strip().replace(" ", "")
    if not spec:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    factors = {"d": 86400, "h": 3600, "m": 60, "s": 1, None: 1}
    while pos < len(spec):
        match = _DURATION.match(spec, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"cannot read duration {text!r}; use e.g. 90s, 15m, 2h or 1h30m")
        unit = match.group("unit")
        total += float(match.group("num")) * factors[unit.lower() if unit else None]
        pos = match.end()
    if total <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return timedelta(seconds=total)


def parse_pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """``k=v`` strings → dict; typer.BadParameter for malformed ones."""
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=what)
        out[key.strip()] = value.strip()
    return out


def is_interactive() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


__all__ = [
    "BrightRunError",
    "ExitCode",
    "Globals",
    "error_line",
    "fail",
    "fmt_ago",
    "fmt_bytes",
    "fmt_duration",
    "fmt_float",
    "fmt_time",
    "fmt_usd",
    "globals_of",
    "parse_duration",
    "parse_pairs",
    "print_json",
    "report_error",
    "stderr",
    "stdout",
]
