"""``brightrun queue`` (show, watch, promote, audit) and ``brightrun usage``."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from brightrun.cli._common import (
    fmt_duration,
    fmt_time,
    fmt_usd,
    globals_of,
    is_interactive,
    print_json,
    stderr,
    stdout,
    to_jsonable,
)
from brightrun.cli.app import JsonOpt, _enum, app
from brightrun.cli.view import state_text
from brightrun.enums import PromotionReason
from brightrun.types import QueueSnapshot, Usage

queue_app = typer.Typer(help="Show the queue, watch it, promote a job, read the audit log.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")


def queue_view(q: QueueSnapshot) -> RenderableType:
    """Waiting jobs with positions and expected starts, running jobs, pools and statistics."""
    parts: list[RenderableType] = []
    s = q.stats
    head = Text(f"{s.depth} waiting, {s.active} running", style="bold")
    head.append(
        f"   average wait {fmt_duration(s.average_wait)}, longest {fmt_duration(s.longest_wait)}, "
        f"{s.throughput_per_day:.1f} jobs/day",
        style="dim",
    )
    parts.append(head)
    pools = ", ".join(
        f"{p.name} {p.used}/{p.slots}"
        + (f" (spot availability {p.spot_availability:.0%})" if p.spot_availability is not None else "")
        for p in q.pools
    )
    if pools:
        parts.append(Text(f"pools: {pools}", style="dim"))
    if q.queued:
        table = Table(title="waiting", title_justify="left", box=None, padding=(0, 2), header_style="bold")
        for column in ("#", "ID", "NAME", "EXPECTED START", "CONFIDENCE", "DURATION", "WAITING", "POOL"):
            table.add_column(column, justify="right" if column in ("#", "DURATION", "WAITING") else "left")
        now = q.time or datetime.now(UTC)
        for entry in q.queued:
            name = Text(entry.name)
            if entry.promoted:
                name.append(" ↑promoted", style="bold magenta")
            waited = now - entry.queued_time if entry.queued_time is not None else None
            table.add_row(
                str(entry.position),
                entry.job_id,
                name,
                fmt_time(entry.estimated_start_time),
                entry.confidence or "-",
                fmt_duration(entry.estimated_duration),
                fmt_duration(waited),
                entry.pool,
            )
        parts += [Text(""), table]
    if q.active:
        table = Table(title="running", title_justify="left", box=None, padding=(0, 2), header_style="bold")
        for column in ("ID", "NAME", "STATE", "PROGRESS", "REMAINING", "POOL"):
            table.add_column(column, justify="right" if column in ("PROGRESS", "REMAINING") else "left")
        for a in q.active:
            table.add_row(a.job_id, a.name, state_text(a.state), f"{a.progress:.0%}", fmt_duration(a.remaining), a.pool)
        parts += [Text(""), table]
    if not q.queued and not q.active:
        parts.append(Text("the queue is empty", style="dim"))
    return Group(*parts)


@queue_app.command("show")
def queue_show(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show waiting jobs (positions, expected starts), running jobs, pools and statistics."""
    with globals_of(ctx).client() as client:
        snapshot = client.queue.get()
    if as_json:
        print_json(snapshot)
    else:
        stdout().print(queue_view(snapshot))


@queue_app.command("watch")
def queue_watch(
    ctx: typer.Context,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per snapshot and line.")] = False,
) -> None:
    """Follow the queue live (on a terminal), or print it each time it changes."""
    with globals_of(ctx).client() as client:
        snapshots = client.queue.watch(timeout=timeout)
        if as_json:
            for snapshot in snapshots:
                sys.stdout.write(json.dumps(to_jsonable(snapshot)) + "\n")
                sys.stdout.flush()
            return
        out = stdout()
        if is_interactive():
            with Live(Text("connecting…"), console=out, refresh_per_second=4) as live:
                for snapshot in snapshots:
                    live.update(queue_view(snapshot))
            return
        for snapshot in snapshots:
            out.print(Text(f"— {fmt_time(snapshot.time)} (version {snapshot.version})", style="dim"))
            out.print(queue_view(snapshot))


@queue_app.command("promote")
def queue_promote(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Id of the waiting job.")],
    reason: Annotated[str, typer.Option(help="Why: " + ", ".join(PromotionReason.choices()) + ".")],
    justification: Annotated[str, typer.Option(help="For the audit log, 100 to 500 characters.")],
    as_json: JsonOpt = False,
) -> None:
    """Move a waiting job to the front of the queue; the audit log records who, when and why."""
    reason_value = _enum(PromotionReason, reason, "--reason")
    length = len(justification.strip())
    if not 100 <= length <= 500:
        raise typer.BadParameter(f"must be 100 to 500 characters, got {length}", param_hint="--justification")
    with globals_of(ctx).client() as client:
        promotion = client.queue.promote(job_id, reason=reason_value or "", justification=justification)
    if as_json:
        print_json(promotion)
        return
    out = stdout()
    out.print(Text.assemble("promoted ", (promotion.job.id, "bold"), " to the front of the queue"))
    for delay in promotion.delayed:
        out.print(Text(f"  delays {delay.job_id} by {fmt_duration(delay.delay)}", style="dim"))


@queue_app.command("audit")
def queue_audit(
    ctx: typer.Context,
    limit: Annotated[int | None, typer.Option(help="Show at most this many.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The queue's audit log (promotions: who, when, why), newest first."""
    with globals_of(ctx).client() as client:
        entries = list(client.queue.audit(limit=limit))
    if as_json:
        print_json(entries)
        return
    if not entries:
        stderr().print("no entries")
        return
    table = Table(box=None, padding=(0, 2), header_style="bold")
    for column in ("WHEN", "ACTION", "JOB", "BY", "REASON", "DELAYED", "JUSTIFICATION"):
        table.add_column(column, overflow="fold" if column == "JUSTIFICATION" else "ellipsis")
    for e in entries:
        table.add_row(
            fmt_time(e.time),
            e.action,
            e.job_id,
            e.actor,
            e.reason.label,
            str(len(e.delayed_job_ids)),
            e.justification,
        )
    stdout().print(table)


def usage_view(usage: Usage) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    grid.add_row("project", Text(usage.project, style="bold"))
    if usage.gpu_hours_quota is None:
        grid.add_row("GPU hours", f"{usage.gpu_hours_used:.2f} this month (no quota)")
    else:
        share = usage.gpu_hours_used / usage.gpu_hours_quota if usage.gpu_hours_quota else 1.0
        style = "bold red" if share >= 1 else "yellow" if share >= 0.8 else "green"
        grid.add_row(
            "GPU hours",
            Text(
                f"{usage.gpu_hours_used:.2f} of {usage.gpu_hours_quota:.2f} this month ({share:.0%}), "
                f"{usage.gpu_hours_remaining or 0:.2f} left",
                style=style,
            ),
        )
    grid.add_row("resets", fmt_time(usage.reset_time))
    if usage.forecast_exhaustion_time is not None:
        grid.add_row("runs out", Text(f"{fmt_time(usage.forecast_exhaustion_time)} at this pace", style="yellow"))
    months = Table(box=None, padding=(0, 2), header_style="bold")
    for column in ("MONTH", "GPU HOURS", "SPEND", "JOBS"):
        months.add_column(column, justify="left" if column == "MONTH" else "right")
    for m in usage.months:
        months.add_row(m.month, f"{m.gpu_hours:.2f}", fmt_usd(m.spend_usd), str(m.jobs))
    return Group(grid, Text(""), months)


@app.command("usage")
def usage_cmd(
    ctx: typer.Context,
    months: Annotated[int, typer.Option(min=1, max=36, help="Months of spend history.")] = 6,
    as_json: JsonOpt = False,
) -> None:
    """GPU hours against the project's monthly quota, when it resets or runs out, and spend per month."""
    with globals_of(ctx).client() as client:
        usage = client.projects.usage(months=months)
    if as_json:
        print_json(usage)
    else:
        stdout().print(usage_view(usage))
