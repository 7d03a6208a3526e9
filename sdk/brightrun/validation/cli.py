"""Offline ``validate`` command: ``brightrun datasets validate FILE`` and
``python -m brightrun.validation FILE``.

Exit codes (for CI pipelines and pre-commit hooks): 0 when the file has no
critical errors, 1 when it has, 2 on usage errors (missing file, bad arguments,
a tokenizer that cannot be loaded).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from brightrun.validation.chat import TokenizerLoadError, TokenizerUnavailableError
from brightrun.validation.formats import DatasetFormat
from brightrun.validation.issues import ValidationIssue, sort_issues
from brightrun.validation.report import ValidationReport, validate_file

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

_BAND_STYLE = {"good": "green", "minor_issues": "yellow", "fix_first": "red"}
_BAND_TEXT = {"good": "Good", "minor_issues": "Minor issues", "fix_first": "Fix errors first"}


def validate_command(
    file: Path,
    base_model: str | None,
    max_seq_len: int | None,
    fmt: str | None,
    as_json: bool,
    max_errors: int,
    *,
    console: Console | None = None,
    err_console: Console | None = None,
) -> int:
    """Validate ``file`` offline and print the result; return the exit code.

    Prints a summary, the first ``max_errors`` issues (critical first) with their
    context excerpts, the score and the readiness checklist; with ``as_json``,
    one JSON document (the full report, excerpts for the first ``max_errors``).
    """
    out = console or Console(highlight=False, soft_wrap=True)
    err = err_console or Console(stderr=True, highlight=False, soft_wrap=True)

    def usage(message: str) -> int:
        if as_json:
            print(json.dumps({"error": message, "exit_code": EXIT_USAGE}))
        else:
            err.print(Text(f"error: {message}", style="red"))
        return EXIT_USAGE

    if fmt is not None and fmt not in {f.value for f in DatasetFormat}:
        return usage(f"unknown format {fmt!r}; use one of {', '.join(f.value for f in DatasetFormat)}")
    if max_seq_len is not None and max_seq_len <= 0:
        return usage("--max-seq-len must be a positive number of tokens")
    if max_seq_len is not None and not base_model:
        return usage("--max-seq-len needs --base-model: token lengths come from its tokenizer")
    if max_errors < 0:
        return usage("--max-errors must be 0 or more")
    if not file.exists():
        return usage(f"no such file: {file}")
    if not file.is_file():
        return usage(f"not a file: {file}")
    try:
        report = validate_file(file, format=fmt, base_model=base_model, max_seq_len=max_seq_len)
    except (TokenizerUnavailableError, TokenizerLoadError) as e:
        return usage(str(e))
    except OSError as e:
        return usage(f"cannot read {file}: {e.strerror or e}")
    code = EXIT_OK if report.passed else EXIT_INVALID
    if as_json:
        print(report.to_json(context_limit=max_errors))
        return code
    _print_report(out, report, max_errors)
    return code


def _print_report(out: Console, report: ValidationReport, max_errors: int) -> None:
    s = report.stats
    size = _size(report.size_bytes)
    out.print(Text(f"{report.path}  ({report.format.value}, {size}, {report.elapsed_seconds:.2f} s)"))
    if report.passed:
        out.print(Text("✓ " + report.summary(), style="bold green"))
    else:
        out.print(Text("✗ " + report.summary(), style="bold red"))
    counts = f"  {s.conversations:,} conversations · {s.training_pairs:,} training pairs · {s.messages:,} messages"
    if s.conversations_with_errors:
        counts += f" · {s.conversations_with_errors:,} conversations with critical errors"
    out.print(Text(counts))
    if report.aborted:
        out.print(Text(f"  validation stopped early: {report.aborted}", style="red"))

    breakdown = report.score_breakdown()
    line = Text("Quality score: ")
    line.append(f"{breakdown.score}/100", style=f"bold {_BAND_STYLE[breakdown.band]}")
    line.append(f" ({_BAND_TEXT[breakdown.band]})")
    parts = [f"-10 x {report.critical_count} critical", f"-2 x {report.warning_count} warnings"]
    if breakdown.bonuses:
        parts.append(" ".join(f"+{v} {k}" for k, v in breakdown.bonuses.items()))
    line.append("   " + ", ".join(parts), style="dim")
    out.print(line)

    if report.issues and max_errors:
        shown = sort_issues(report.issues, "severity")[:max_errors]
        total = report.critical_count + report.warning_count
        out.print()
        out.print(Text(f"First {len(shown)} of {total:,} issues (critical first):", style="bold"))
        for n, issue in enumerate(shown, start=1):
            _print_issue(out, report, n, issue)
    if report.counts_by_type:
        out.print()
        by_type = Text("By type: ")
        for k, (t, n) in enumerate(sorted(report.counts_by_type.items(), key=lambda kv: -kv[1])):
            crit = report.critical_by_type.get(t, 0)
            by_type.append(("" if k == 0 else ", ") + f"{t} {n:,}")
            if crit:
                by_type.append(f" ({crit:,} critical)", style="red")
        out.print(by_type)
        omitted = sum(report.omitted_by_type.values())
        if omitted:
            out.print(Text(f"({omitted:,} issues counted but not listed: per-type cap)", style="dim"))

    out.print()
    out.print(Text("Readiness:", style="bold"))
    for check in report.readiness():
        mark, style = {True: ("✓", "green"), False: ("✗", "red"), None: ("-", "dim")}[check.passed]
        row = Text(f"  {mark} ", style=style)
        row.append(f"{check.name}: ", style="bold")
        row.append(check.detail)
        out.print(row)
    _print_lengths(out, report)
    _print_scaffolding(out, report)


def _print_issue(out: Console, report: ValidationReport, n: int, issue: ValidationIssue) -> None:
    style = "red" if issue.is_critical else "yellow"
    head = Text(f"{n:>3}. ")
    head.append(f"[{issue.severity}] {issue.type}", style=f"bold {style}")
    head.append(f" — {issue.where()}")
    out.print(head)
    where = issue.path or "(file)"
    if issue.line is not None:
        where += f"  line {issue.line}"
        if issue.column is not None:
            where += f", column {issue.column}"
    out.print(Text("     " + where, style="cyan"))
    out.print(Text("     " + issue.message))
    if issue.expected or issue.found:
        out.print(Text(f"     expected: {issue.expected or '-'}   found: {issue.found or '-'}", style="dim"))
    if issue.suggested_fix:
        out.print(Text("     fix: " + issue.suggested_fix, style="green"))
    excerpt = report.context(issue, before=3, after=3)
    if excerpt is not None and excerpt.lines:
        for row in excerpt.render().splitlines():
            caret = row.lstrip().startswith("|") and row.rstrip().endswith("^")
            marked = row.startswith(">>") or caret
            out.print(Text("     " + row, style="bold" if marked else "dim"))


def _print_lengths(out: Console, report: ValidationReport) -> None:
    s = report.stats
    summary = s.length_summary
    if not summary.count:
        return
    out.print()
    unit = s.length_unit
    out.print(
        Text(
            f"Lengths ({unit}): min {summary.min:,} · median ≈{summary.p50:,} · "
            f"p95 ≈{summary.p95:,} · max {summary.max:,} · mean {summary.mean:,}",
            style="bold",
        )
    )
    peak = max((b.count for b in s.length_histogram), default=0)
    for b in s.length_histogram:
        if not b.count:
            continue
        label = f"{b.low:>6,}-{b.high - 1:<6,}" if b.high is not None else f"{b.low:>6,}+      "
        bar = "█" * max(1, round(30 * b.count / peak))
        out.print(Text(f"  {label} {bar} {b.count:,}"))
    t = s.tokens
    if t is not None and t.over_max_seq_len:
        out.print(
            Text(
                f"  {t.over_max_seq_len:,} examples over max_seq_len {t.max_seq_len} "
                f"(by up to {t.max_overflow:,} tokens; {t.targets_truncated:,} lose target tokens)",
                style="yellow",
            )
        )


def _print_scaffolding(out: Console, report: ValidationReport) -> None:
    s = report.stats
    for name, dist in (("persona", s.persona), ("emotional_arc", s.emotional_arc), ("topic", s.topic)):
        if not dist:
            continue
        top = list(dist.items())[:6]
        more = f", … ({len(dist) - 6} more)" if len(dist) > 6 else ""
        out.print(Text(f"{name}: " + ", ".join(f"{k} {v:,}" for k, v in top) + more))
    if s.quality_rating is not None:
        out.print(Text(f"quality rating: {s.quality_rating:.1f}/5.0 ({s.quality_rating_source})"))


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m brightrun.validation FILE [--base-model M] [--max-seq-len N] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m brightrun.validation",
        description="Validate a BrightRun training file offline.",
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("--base-model", help="tokenizer for token checks: local path or hub name")
    parser.add_argument("--max-seq-len", type=int, help="token limit (default 2048 with --base-model)")
    parser.add_argument("--format", dest="fmt", choices=[f.value for f in DatasetFormat])
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the report as JSON")
    parser.add_argument("--max-errors", type=int, default=20, help="issues to print (default 20)")
    args = parser.parse_args(argv)
    return validate_command(args.file, args.base_model, args.max_seq_len, args.fmt, args.as_json, args.max_errors)


if __name__ == "__main__":
    sys.exit(main())
