"""``brightrun jobs`` commands that act on failures and many jobs: pause,
resume, retry (with fixes), fixes, resume-from-checkpoint, report, decide,
checkpoints, on-demand, export and bulk-cancel."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from brightrun.cli._common import (
    ExitCode,
    fmt_bytes,
    fmt_duration,
    fmt_float,
    fmt_time,
    fmt_usd,
    globals_of,
    print_json,
    stderr,
    stdout,
)
from brightrun.cli.app import JsonOpt, _enum, _overrides, jobs_app
from brightrun.cli.view import state_text, status_banner
from brightrun.enums import CancelReason, JobState, LrScheduleMode, PricingTier, RecoveryChoice
from brightrun.types import FailureReport, FixSuggestions, JobBase, RecoveryFix

GpuOpt = Annotated[str | None, typer.Option("--gpu-type", help="GPU type from the catalog, e.g. A100-80GB.")]
PricingOpt = Annotated[str | None, typer.Option("--pricing", help="spot or on_demand.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Create it even if an unfinished job trains the same data and config.")
]


def _job_line(verb: str, job: JobBase) -> Text:
    text = Text.assemble(f"{verb} ", (job.id, "bold"), ": now ", state_text(job.state))
    if job.name:
        text.append(f"  {job.name}", style="dim")
    return text


def _show(job: JobBase, verb: str, as_json: bool) -> None:
    if as_json:
        print_json(job)
        return
    out = stdout()
    out.print(_job_line(verb, job))
    banner = status_banner(job)
    if banner is not None:
        out.print(banner)


# ------------------------------------------------------------------ pause, resume, on-demand


@jobs_app.command("pause")
def jobs_pause(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], as_json: JsonOpt = False
) -> None:
    """Checkpoint a training job and stop its worker; costs stop until it is resumed."""
    with globals_of(ctx).client() as client:
        job = client.jobs.pause(job_id)
    _show(job, "pause requested for", as_json)


@jobs_app.command("resume")
def jobs_resume(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    gpu_type: GpuOpt = None,
    pricing: PricingOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a paused job again; it continues from its pause checkpoint, optionally on other compute."""
    pricing_value = _enum(PricingTier, pricing, "--pricing")
    with globals_of(ctx).client() as client:
        job = client.jobs.resume(job_id, gpu_type=gpu_type, pricing=pricing_value)
    _show(job, "resumed", as_json)
    if not as_json:
        stdout().print(Text(f"on {job.compute.gpu_type} {job.compute.pricing_tier}", style="dim"))


@jobs_app.command("on-demand")
def jobs_on_demand(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], as_json: JsonOpt = False
) -> None:
    """Move a job to on-demand capacity: a running spot attempt continues, later ones use on-demand."""
    with globals_of(ctx).client() as client:
        job = client.jobs.switch_to_on_demand(job_id)
    if as_json:
        print_json(job)
        return
    stdout().print(Text.assemble("switched ", (job.id, "bold"), f" to on-demand at ${job.cost.hourly_rate_usd:.2f}/h"))


# ------------------------------------------------------------------ fixes and retries


def _effect(fix: RecoveryFix) -> str:
    e = fix.effect
    parts = []
    if e.memory_bytes is not None:
        before = e.memory_bytes_before
        parts.append(f"peak {fmt_bytes(e.memory_bytes)}" + (f" (from {fmt_bytes(before)})" if before else ""))
    if e.duration_hours is not None:
        parts.append(f"{e.duration_hours.low:.2f} to {e.duration_hours.high:.2f} h")
    if e.cost_usd is not None:
        parts.append(f"{fmt_usd(e.cost_usd.low)} to {fmt_usd(e.cost_usd.high)}")
    if not parts and e.summary and e.summary != fix.title:
        parts.append(e.summary)
    return "\n".join(parts) or "-"


def _changes(fix: RecoveryFix) -> str:
    changes = fix.changes()
    if not changes:
        return "same configuration" if fix.applicable else "needs your action"
    shown = []
    for name, value in changes.items():
        if isinstance(value, tuple):
            value = ",".join(value)
        elif hasattr(value, "total_seconds"):
            value = fmt_duration(value)
        shown.append(f"{name}={value}")
    return "\n".join(shown)


def fixes_table(job_id: str, fixes: FixSuggestions) -> RenderableType:
    head = Text(f"fixes for {job_id} ({fixes.failure_class.label}), best first", style="bold")
    table = Table(box=None, padding=(0, 2), header_style="bold")
    for column in ("#", "ID", "FIX", "CHANGES", "EXPECTED", "CONFIDENCE", "NOT WITH"):
        table.add_column(column, justify="right" if column == "#" else "left", overflow="fold")
    for i, fix in enumerate(fixes, 1):
        style = "" if fix.applicable else "dim"
        table.add_row(
            str(i),
            Text(fix.id, style="bold" if fix is fixes.top else style),
            Text(fix.title, style=style),
            _changes(fix),
            _effect(fix),
            Text(str(fix.confidence), style="yellow" if fix.confidence.experimental else "green"),
            ", ".join(fix.incompatible_with) or "-",
        )
    parts: list[RenderableType] = [head, table]
    for fix in fixes:
        if not fix.applicable:
            parts.append(Text(f"{fix.id}: {fix.description}", style="yellow"))
    if fixes.top is not None:
        parts.append(
            Text(
                f"retry with: brightrun jobs retry {job_id} --suggested   (or --fix ID, repeatable)",
                style="dim",
            )
        )
    return Group(*parts)


@jobs_app.command("fixes")
def jobs_fixes(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], as_json: JsonOpt = False
) -> None:
    """Rank the fixes for a failed job: changes, expected effect, confidence (experimental under 20 outcomes)."""
    with globals_of(ctx).client() as client:
        fixes = client.jobs.suggest_fixes(job_id)
    if as_json:
        print_json({"failure_class": str(fixes.failure_class), "fixes": [f.model_dump(mode="json") for f in fixes]})
        return
    stdout().print(fixes_table(job_id, fixes))


@jobs_app.command("retry")
def jobs_retry(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Id of the failed or cancelled job.")],
    fix: Annotated[
        list[str] | None, typer.Option("--fix", help="Apply this suggested fix (see `jobs fixes`); repeatable.")
    ] = None,
    suggested: Annotated[
        bool, typer.Option("--suggested", help="Apply the best suggested fix a retry can apply.")
    ] = False,
    request_id: Annotated[str | None, typer.Option(help="Idempotency key: repeating it returns the same job.")] = None,
    acknowledge_oom_risk: Annotated[
        bool, typer.Option("--acknowledge-oom-risk", help="Create it even if the estimate says out of memory.")
    ] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Retry a failed or cancelled job as a new, linked job: the same configuration, or with fixes.

    Exits 1 when no fix applies (e.g. a dataset error: fix the file and upload it again).
    """
    if fix and suggested:
        raise typer.BadParameter("use either --fix or --suggested", param_hint="--suggested")
    with globals_of(ctx).client() as client:
        if suggested:
            retry = client.jobs.retry_with_suggested_fix(
                job_id, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
            )
        else:
            retry = client.jobs.retry(
                job_id, fixes=fix, request_id=request_id, acknowledge_oom_risk=acknowledge_oom_risk, force=force
            )
    if as_json:
        print_json(retry)
        return
    out = stdout()
    out.print(Text.assemble("created ", (retry.id, "bold"), "  ", state_text(retry.state), f"  {retry.name}"))
    if retry.lineage is not None and retry.lineage.applied_fixes:
        out.print(Text(f"fixes applied: {', '.join(retry.lineage.applied_fixes)}", style="dim"))
    out.print(Text(f"follow it with: brightrun jobs watch {retry.id}", style="dim"))


@jobs_app.command("resume-from-checkpoint")
def jobs_resume_from_checkpoint(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Id of the ended job to continue.")],
    checkpoint: Annotated[
        str | None, typer.Option(help="Checkpoint id (see `jobs checkpoints`); default the newest that verifies.")
    ] = None,
    lr_schedule: Annotated[str, typer.Option(help="continue or restart_warmup.")] = "continue",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Change a field: batch_size, gradient_accumulation_steps, epochs, learning_rate, warmup_ratio, "
            "max_steps, checkpoint_interval_steps, eval_interval_steps, gradient_checkpointing; repeatable.",
            metavar="KEY=VALUE",
        ),
    ] = None,
    gpu_type: GpuOpt = None,
    pricing: PricingOpt = None,
    request_id: Annotated[str | None, typer.Option(help="Idempotency key: repeating it returns the same job.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a continuation job from a checkpoint of an ended job (rank, alpha and target modules are locked)."""
    mode = _enum(LrScheduleMode, lr_schedule, "--lr-schedule")
    pricing_value = _enum(PricingTier, pricing, "--pricing")
    changes = _overrides(set_)
    with globals_of(ctx).client() as client:
        try:
            job = client.jobs.resume_from_checkpoint(
                job_id,
                checkpoint,
                lr_schedule=mode or LrScheduleMode.CONTINUE,
                gpu_type=gpu_type,
                pricing=pricing_value,
                request_id=request_id,
                force=force,
                **changes,
            )
        except TypeError as e:
            raise typer.BadParameter(str(e), param_hint="--set") from None
    if as_json:
        print_json(job)
        return
    out = stdout()
    out.print(Text.assemble("created ", (job.id, "bold"), "  ", state_text(job.state), f"  {job.name}"))
    if job.lineage is not None:
        out.print(
            Text(f"continues {job.lineage.resumed_from_job_id} from {job.lineage.resumed_from_checkpoint_id}", "dim")
        )


@jobs_app.command("checkpoints")
def jobs_checkpoints(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], as_json: JsonOpt = False
) -> None:
    """List a job's complete checkpoints, newest first."""
    with globals_of(ctx).client() as client:
        checkpoints = client.jobs.list_checkpoints(job_id)
    if as_json:
        print_json(checkpoints)
        return
    if not checkpoints:
        stderr().print("no checkpoints")
        return
    table = Table(box=None, padding=(0, 2), header_style="bold")
    for column in ("ID", "STEP", "EPOCH", "ATTEMPT", "SIZE", "WRITTEN", "SHA-256"):
        table.add_column(column, justify="right" if column in ("STEP", "EPOCH", "ATTEMPT", "SIZE") else "left")
    for c in checkpoints:
        table.add_row(
            c.id,
            str(c.step),
            f"{c.epoch:.2f}",
            str(c.attempt),
            fmt_bytes(c.size_bytes),
            fmt_time(c.create_time),
            c.manifest_sha256[:12],
        )
    stdout().print(table)


# ------------------------------------------------------------------ report and decisions


def report_details(report: FailureReport) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    f = report.failure
    if f is not None:
        grid.add_row("failure", Text(f"{f.failure_class.label}: {f.reason}", style="bold red"))
        if f.message and f.message != f.reason:
            grid.add_row("message", f.message)
        grid.add_row("where", f"{f.stage.label}, step {f.step}")
        grid.add_row("origin", f"{f.origin.label} ({'retryable' if f.retryable else 'not retryable as is'})")
        for i, line in enumerate(f.evidence):
            grid.add_row("evidence" if i == 0 else "", line)
    grid.add_row("model", report.base_model)
    grid.add_row("progress", f"step {report.last_completed_step} of {report.total_steps or '?'}")
    p = report.partial_outputs
    grid.add_row(
        "left behind",
        f"{p.checkpoints} checkpoints, {p.metric_points} metric points, {p.events} events"
        + (f", last loss {fmt_float(p.last_train_loss)}" if p.last_train_loss is not None else "")
        + (f", last eval {fmt_float(p.last_eval_loss)}" if p.last_eval_loss is not None else ""),
    )
    for i, c in enumerate(report.checkpoints[:5]):
        grid.add_row("checkpoints" if i == 0 else "", f"{c.id} at step {c.step}")
    a = report.actual
    used = f"{fmt_usd(a.spend_usd)} over {fmt_duration(a.billed_seconds)} billed, {a.attempts} attempt(s)"
    if a.peak_memory_bytes is not None:
        used += f", peak memory {fmt_bytes(a.peak_memory_bytes)}"
    grid.add_row("actual", used)
    e = report.estimate
    if e is not None:
        grid.add_row("estimated", f"peak memory {fmt_bytes(e.total_bytes)} of {fmt_bytes(e.capacity_bytes)}")
    if report.interruptions:
        grid.add_row("interruptions", f"{len(report.interruptions)}")
    shown = report.files_written[:8]
    for i, name in enumerate(shown):
        grid.add_row("files" if i == 0 else "", name)
    if len(report.files_written) > len(shown):
        grid.add_row("", f"… {len(report.files_written) - len(shown)} more")
    commands = {
        "retry": f"brightrun jobs retry {report.job_id}",
        "retry_with_fix": f"brightrun jobs retry {report.job_id} --suggested",
        "resume_from_checkpoint": f"brightrun jobs resume-from-checkpoint {report.job_id}",
        "fix_dataset": "brightrun datasets validate FILE",
    }
    actions: list[RenderableType] = [Text("what you can do", style="bold")]
    for action in report.actions:
        item = Text("• ")
        item.append(action.title, style="bold")
        if action.description:
            item.append(f" — {action.description}")
        actions.append(item)
        if action.kind in commands:
            actions.append(Text(f"    $ {commands[action.kind]}", style="dim"))
    return Group(grid, Text(""), *actions)


@jobs_app.command("report")
def jobs_report(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], as_json: JsonOpt = False
) -> None:
    """The failure report of a failed or cancelled job: what, where, what is left, what to do."""
    with globals_of(ctx).client() as client:
        report = client.jobs.failure_report(job_id)
    if as_json:
        print_json(report)
    else:
        stdout().print(report_details(report))


@jobs_app.command("decide")
def jobs_decide(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    choice: Annotated[
        str, typer.Argument(help="One of the job's choices: keep_trying, switch_to_on_demand, cancel, extend.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Choose how a job awaiting a decision continues (see its choices with `jobs show`)."""
    value = _enum(RecoveryChoice, choice, "CHOICE")
    if value is None or value is RecoveryChoice.UNSPECIFIED:
        raise typer.BadParameter(f"one of {', '.join(RecoveryChoice.choices())}", param_hint="CHOICE")
    with globals_of(ctx).client() as client:
        job = client.jobs.decide(job_id, value)
    _show(job, f"decided {value} for", as_json)


# ------------------------------------------------------------------ many jobs


@jobs_app.command("export")
def jobs_export(
    ctx: typer.Context,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (atomically) instead of stdout.")
    ] = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    filter: Annotated[str | None, typer.Option(help="Filter, as in `jobs list`.")] = None,
    query: Annotated[str | None, typer.Option(help="Only jobs whose name, description or labels contain this.")] = None,
    order_by: Annotated[str | None, typer.Option(help='Sort, e.g. "spend_usd desc".')] = None,
) -> None:
    """Export jobs as CSV (every job matching the filters, header first)."""
    state_value = _enum(JobState, state, "--state")
    with globals_of(ctx).client() as client:
        if output is None:
            client.jobs.export(sys.stdout, filter=filter, state=state_value, query=query, order_by=order_by)
            return
        written = client.jobs.export(output, filter=filter, state=state_value, query=query, order_by=order_by)
    stderr().print(f"wrote {fmt_bytes(written)} to {output}", highlight=False)


@jobs_app.command("bulk-cancel")
def jobs_bulk_cancel(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why: " + ", ".join(CancelReason.choices()) + ".")],
    job_ids: Annotated[list[str] | None, typer.Argument(help="Job ids.", show_default=False)] = None,
    note: Annotated[str, typer.Option(help="Free text, at most 500 characters.")] = "",
    state: Annotated[str | None, typer.Option(help="Also every job in this state.")] = None,
    filter: Annotated[str | None, typer.Option(help="Also every job matching this filter.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Cancel many jobs, by id and/or by filter. Exits 1 if any could not be cancelled."""
    reason_value = _enum(CancelReason, reason, "--reason")
    if reason_value is None or reason_value is CancelReason.UNSPECIFIED:
        raise typer.BadParameter(f"required: one of {', '.join(CancelReason.choices())}", param_hint="--reason")
    state_value = _enum(JobState, state, "--state")
    if not job_ids and not filter and state_value is None:
        raise typer.BadParameter("name jobs, or select them with --state / --filter", param_hint="JOB_IDS")
    if (filter or state_value) and not yes and sys.stdin.isatty():
        what = " AND ".join(x for x in (f"state = {state_value}" if state_value else "", filter or "") if x)
        if not typer.confirm(f"Cancel every job matching {what}?"):
            raise typer.Exit(ExitCode.FAILED)
    with globals_of(ctx).client() as client:
        results = client.jobs.bulk_cancel(job_ids, filter=filter, state=state_value, reason=reason_value, note=note)
    if as_json:
        print_json(results)
    else:
        table = Table(box=None, padding=(0, 2), header_style="bold")
        for column in ("ID", "STATE", "RESULT"):
            table.add_column(column)
        for r in results:
            table.add_row(r.job_id, state_text(r.state), Text(r.error or "ok", style="red" if r.error else "green"))
        stdout().print(table)
        failed = sum(1 for r in results if not r.ok)
        stderr().print(f"{len(results) - failed} cancelled" + (f", {failed} not" if failed else ""))
    if any(not r.ok for r in results):
        raise typer.Exit(ExitCode.FAILED)
