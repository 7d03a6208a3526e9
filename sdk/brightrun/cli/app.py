"""The ``brightrun`` command: datasets, jobs, the server and the demo. The jobs
commands about failures and many jobs live in :mod:`brightrun.cli.control`,
the queue and usage in :mod:`brightrun.cli.queue`, API keys and ``whoami`` in
:mod:`brightrun.cli.keys`."""

from __future__ import annotations

import asyncio
import csv
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from brightrun._transport import DEFAULT_TARGET
from brightrun.cli import gates as gates_mod
from brightrun.cli._common import (
    ExitCode,
    Globals,
    error_line,
    fail,
    fmt_ago,
    fmt_bytes,
    fmt_float,
    fmt_time,
    fmt_usd,
    globals_of,
    is_interactive,
    parse_duration,
    parse_pairs,
    print_json,
    report_error,
    stderr,
    stdout,
    to_jsonable,
)
from brightrun.cli.view import estimate_details, job_details, print_summary, state_text, watch_job
from brightrun.enums import (
    CancelReason,
    DatasetFormat,
    DatasetState,
    EventType,
    IssueOrder,
    IssueSeverity,
    JobState,
    Preset,
    PricingTier,
    ProtoEnum,
)
from brightrun.errors import BrightRunError, WaitTimeout
from brightrun.types import Dataset, DatasetIssue, JobBase, JobEvent, MetricPoint

E = TypeVar("E", bound=ProtoEnum)


class _Group(TyperGroup):
    """Turns SDK errors into one clear line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrightRunError as e:
            g = ctx.find_object(Globals)
            report_error(e, g.target if g else None)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            report_error(e)
        except KeyboardInterrupt:
            stderr().print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None


app = typer.Typer(
    name="brightrun",
    cls=_Group,
    help="BrightRun: run LoRA / QLoRA fine-tuning jobs and keep them alive.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
datasets_app = typer.Typer(help="Upload, list, inspect, validate and delete datasets.", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Create, follow, gate and cancel fine-tuning jobs; pause, resume, retry and continue them.",
    no_args_is_help=True,
)
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")


def _version_callback(value: bool) -> None:
    if value:
        from brightrun import __version__

        typer.echo(f"brightrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Option("--target", envvar="BRIGHTRUN_TARGET", help="Server address host:port.", show_envvar=True),
    ] = DEFAULT_TARGET,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="BRIGHTRUN_API_KEY",
            help="API key (sent as a Bearer token); without it, the key in the file $BRIGHTRUN_API_KEY_FILE names.",
            show_default=False,
        ),
    ] = None,
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            envvar="BRIGHTRUN_TLS",
            help="Connect over TLS (the system's CAs unless --tls-ca); on by default when a certificate is given.",
            show_default=False,
        ),
    ] = None,
    tls_ca: Annotated[
        str | None,
        typer.Option("--tls-ca", envvar="BRIGHTRUN_TLS_CA", help="CA (PEM) that signed the server's certificate."),
    ] = None,
    tls_cert: Annotated[
        str | None,
        typer.Option("--tls-cert", envvar="BRIGHTRUN_TLS_CERT", help="Client certificate (PEM), for mutual TLS."),
    ] = None,
    tls_key: Annotated[
        str | None,
        typer.Option("--tls-key", envvar="BRIGHTRUN_TLS_KEY", help="Client certificate's private key (PEM)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = Globals(target=target, api_key=api_key, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)


def _enum(cls: type[E], value: str | None, param: str) -> E | None:
    if value is None:
        return None
    try:
        return cls.parse(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(cls.choices())}", param_hint=param) from None


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

#: Seconds between progress lines of ``jobs wait``.
PROGRESS_EVERY = 30.0


# ====================================================================== server


@app.command("server")
def server_cmd(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 50051; 0 picks a free one).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where datasets, artifacts and SQLite live.")] = None,
    database_url: Annotated[str | None, typer.Option(help="sqlite:///... or postgresql://...")] = None,
    max_concurrent_jobs: Annotated[int | None, typer.Option(help="Jobs that may run at once.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML settings file.", exists=True, dir_okay=False)
    ] = None,
) -> None:
    """Run a BrightRun server (embedded defaults: SQLite and the local executor)."""
    try:
        # Imported by name so the SDK's type check does not follow into the
        # server package (which the base install does not have).
        server_main = importlib.import_module("brightrun_server.__main__").main
    except ImportError as e:
        fail(f"the server is not installed ({e.name or e}); install it with: pip install 'brightrun[server]'")
    argv: list[str] = []
    for flag, value in (
        ("--host", host),
        ("--port", port),
        ("--data-dir", data_dir),
        ("--database-url", database_url),
        ("--max-concurrent-jobs", max_concurrent_jobs),
        ("--config", config),
    ):
        if value is not None:
            argv += [flag, str(value)]
    server_main(argv)


@app.command("demo")
def demo_cmd(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory for the demo server (default ~/.brightrun/demo).")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="Dataset to train on (default examples/data/support_chat.jsonl).")
    ] = None,
    keep_server: Annotated[bool, typer.Option(help="Leave the server running when the demo ends.")] = False,
    epochs: Annotated[
        int | None, typer.Option(min=1, max=10, help="Train for this many epochs instead of the demo's 8 (quicker).")
    ] = None,
) -> None:
    """Start a server, train a tiny model on the example data, and watch it live."""
    from brightrun.cli.demo import run_demo

    raise typer.Exit(run_demo(data_dir=data_dir, dataset=dataset, keep_server=keep_server, epochs=epochs))


# ====================================================================== datasets


def dataset_details(ds: Dataset) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    style = {DatasetState.READY: "green", DatasetState.INVALID: "red"}.get(ds.state, "yellow")
    grid.add_row("dataset", Text(ds.id, style="bold"))
    grid.add_row("name", ds.name)
    grid.add_row("state", Text(ds.state.label.upper(), style=style))
    grid.add_row("format", ds.format.label)
    grid.add_row("file", f"{ds.filename} ({fmt_bytes(ds.size_bytes)}, sha256 {ds.sha256[:12]}…)")
    s = ds.stats
    grid.add_row(
        "contents", f"{s.conversations:,} conversations, {s.training_pairs:,} training pairs, {s.messages:,} messages"
    )
    v = ds.validation
    quality = Text(
        f"{v.quality_score}/100",
        style="green" if v.quality_score >= 90 else "yellow" if v.quality_score >= 70 else "red",
    )
    quality.append(f"  {v.critical_count} critical, {v.warning_count} warnings", style="dim")
    if v.quality_band:
        quality.append(f"  ({v.quality_band.replace('_', ' ')})", style="dim")
    grid.add_row("quality", quality)
    if v.counts_by_type:
        by_type = sorted(v.counts_by_type.items(), key=lambda kv: -kv[1])
        grid.add_row("by type", ", ".join(f"{k} {n}" for k, n in by_type))
    for i, message in enumerate(v.first_errors):
        grid.add_row("issues" if i == 0 else "", Text(message, style="red" if v.critical_count else "yellow"))
    for i, check in enumerate(v.readiness):
        mark, style = ("✓", "green") if check.passed else ("?", "dim") if check.passed is None else ("✗", "red")
        line = Text(f"{mark} {check.name.replace('_', ' ')}", style=style)
        line.append(f"  {check.detail}", style="dim")
        grid.add_row("readiness" if i == 0 else "", line)
    if s.length_histogram:
        widest = max(b.count for b in s.length_histogram) or 1
        for i, bucket in enumerate(s.length_histogram):
            span = f"{bucket.low}-{bucket.high}" if bucket.high is not None else f"{bucket.low}+"
            bar = "█" * max(1 if bucket.count else 0, round(bucket.count / widest * 30))
            grid.add_row(f"{s.length_unit or 'length'}" if i == 0 else "", f"{span:>11} {bar} {bucket.count}")
    for label, counts in (("personas", s.personas), ("arcs", s.emotional_arcs), ("topics", s.topics)):
        if counts:
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
            grid.add_row(label, ", ".join(f"{k} {n}" for k, n in top) + (" …" if len(counts) > 8 else ""))
    grid.add_row("uploaded", fmt_time(ds.create_time))
    return grid


@datasets_app.command("upload")
def datasets_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The training file.")],
    name: Annotated[str | None, typer.Option(help="Display name (default: the file name).")] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="chat_jsonl, conversations or instruction_jsonl (default: detect).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload and validate a dataset. Exits 1 if it has critical errors."""
    fmt = _enum(DatasetFormat, format, "--format")
    g = globals_of(ctx)
    with g.client() as client:
        if is_interactive() and not as_json:
            columns = (
                TextColumn("uploading"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=stderr(), transient=True) as bar:
                task = bar.add_task("upload", total=file.stat().st_size)
                ds = client.datasets.upload(
                    file,
                    name=name,
                    format=fmt,
                    progress=lambda sent, total: bar.update(task, completed=sent, total=total),
                )
        else:
            ds = client.datasets.upload(file, name=name, format=fmt)
    if as_json:
        print_json(ds)
    else:
        stdout().print(dataset_details(ds))
    if ds.state is DatasetState.INVALID:
        stderr().print(
            f"[red]dataset {ds.id} has {ds.validation.critical_count} critical error(s); jobs cannot use it[/]"
        )
        raise typer.Exit(ExitCode.FAILED)


@datasets_app.command("list")
def datasets_list(
    ctx: typer.Context,
    filter: Annotated[str | None, typer.Option(help="Filter, e.g. 'state = READY AND name = \"support\"'.")] = None,
    limit: Annotated[int | None, typer.Option(help="Show at most this many.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List datasets, newest first."""
    with globals_of(ctx).client() as client:
        items = list(client.datasets.list(filter=filter, limit=limit))
    if as_json:
        print_json(items)
        return
    table = Table(box=None, padding=(0, 2), header_style="bold")
    for column in ("ID", "NAME", "FORMAT", "STATE", "PAIRS", "QUALITY", "SIZE", "UPLOADED"):
        table.add_column(column, justify="right" if column in ("PAIRS", "QUALITY", "SIZE") else "left")
    for ds in items:
        style = {DatasetState.READY: "green", DatasetState.INVALID: "red"}.get(ds.state, "yellow")
        table.add_row(
            ds.id,
            ds.name,
            ds.format.label,
            Text(ds.state.label, style=style),
            f"{ds.stats.training_pairs:,}",
            str(ds.validation.quality_score),
            fmt_bytes(ds.size_bytes),
            fmt_ago(ds.create_time),
        )
    if not items:
        stderr().print("no datasets")
        return
    stdout().print(table)


@datasets_app.command("show")
def datasets_show(
    ctx: typer.Context, dataset_id: Annotated[str, typer.Argument(help="Dataset id.")], as_json: JsonOpt = False
) -> None:
    """Show one dataset and its validation summary."""
    with globals_of(ctx).client() as client:
        ds = client.datasets.get(dataset_id)
    if as_json:
        print_json(ds)
    else:
        stdout().print(dataset_details(ds))


@datasets_app.command("delete")
def datasets_delete(
    ctx: typer.Context,
    dataset_id: Annotated[str, typer.Argument(help="Dataset id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a dataset that no unfinished job uses."""
    if not yes and sys.stdin.isatty() and not typer.confirm(f"Delete dataset {dataset_id}?"):
        raise typer.Exit(ExitCode.FAILED)
    with globals_of(ctx).client() as client:
        client.datasets.delete(dataset_id)
    stdout().print(f"deleted {dataset_id}")


@datasets_app.command("revalidate")
def datasets_revalidate(
    ctx: typer.Context,
    dataset_id: Annotated[str, typer.Argument(help="Dataset id.")],
    base_model: Annotated[
        str | None, typer.Option(help="Check token lengths and the chat template with this model.")
    ] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Maximum tokens per example (default 2048).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a stored dataset again on the server (e.g. with a model's tokenizer)."""
    with globals_of(ctx).client() as client:
        ds = client.datasets.validate(dataset_id, base_model=base_model, max_seq_length=max_seq_len)
    if as_json:
        print_json(ds)
    else:
        stdout().print(dataset_details(ds))
    if ds.state is DatasetState.INVALID:
        raise typer.Exit(ExitCode.FAILED)


@datasets_app.command("errors")
def datasets_errors(
    ctx: typer.Context,
    dataset_id: Annotated[str, typer.Argument(help="Dataset id.")],
    critical_only: Annotated[bool, typer.Option("--critical-only", help="Only critical problems.")] = False,
    order: Annotated[str, typer.Option(help="index, type or severity.")] = "index",
    type_: Annotated[list[str] | None, typer.Option("--type", help="Only this error type; repeatable.")] = None,
    context: Annotated[bool, typer.Option("--context", help="Show the lines around each problem.")] = False,
    limit: Annotated[int | None, typer.Option(help="Show at most this many.")] = 50,
    as_csv: Annotated[bool, typer.Option("--csv", help="Export every problem as CSV (from the server).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line.")] = False,
) -> None:
    """List the problems the latest validation of a stored dataset found."""
    order_by = _enum(IssueOrder, order, "--order")
    with globals_of(ctx).client() as client:
        if as_csv:
            for chunk in client.datasets.export_errors(dataset_id, critical_only=critical_only, order_by=order_by):
                sys.stdout.write(chunk.decode("utf-8"))
            sys.stdout.flush()
            return
        issues = client.datasets.list_errors(
            dataset_id,
            order_by=order_by,
            critical_only=critical_only,
            types=type_,
            include_context=context,
            limit=limit,
        )
        out = stdout()
        count = 0
        for issue in issues:
            count += 1
            if as_json:
                sys.stdout.write(json.dumps(to_jsonable(issue)) + "\n")
                continue
            out.print(_issue_text(issue), soft_wrap=True)
            if context and issue.context is not None:
                for line in issue.context.lines:
                    marker = ">" if line.marked else " "
                    style = "bold" if line.marked else "dim"
                    out.print(Text(f"    {marker} {line.number:>6} | {line.text}", style=style), soft_wrap=True)
                    if line.marked and issue.context.caret is not None:
                        out.print(Text(" " * (15 + issue.context.caret) + "^", style="red"))
        if not count and not as_json:
            stderr().print("no problems found")


def _issue_text(issue: DatasetIssue) -> Text:
    style = "red" if issue.severity is IssueSeverity.CRITICAL else "yellow"
    where = issue.field_path or "-"
    if issue.line is not None:
        where += f" (line {issue.line}" + (f", col {issue.column}" if issue.column is not None else "") + ")"
    text = Text(f"{issue.severity.label:<8} ", style=style)
    text.append(f"{issue.type:<24} ", style="bold")
    text.append(f"{where}  ", style="dim")
    text.append(issue.message)
    if issue.suggested_fix:
        text.append(f"  → {issue.suggested_fix}", style="green")
    return text


@datasets_app.command("validate")
def datasets_validate(
    file: Annotated[Path, typer.Argument(help="The training file.")],
    base_model: Annotated[
        str | None, typer.Option(help="Tokenizer to count tokens with (needs the trainer extra).")
    ] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Flag examples longer than this many tokens.")] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="chat_jsonl, conversations or instruction_jsonl.")
    ] = None,
    as_json: JsonOpt = False,
    max_errors: Annotated[int, typer.Option(help="Show at most this many issues.")] = 20,
) -> None:
    """Validate a dataset locally, without a server. Exit 0 ok, 1 critical errors, 2 usage."""
    try:
        from brightrun.validation.cli import validate_command
    except ImportError as e:
        fail(f"dataset validation is unavailable in this version: {e}")
    raise typer.Exit(validate_command(file, base_model, max_seq_len, format, as_json, max_errors))


# ====================================================================== jobs


def _overrides(values: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parse_pairs(values, "--set").items():
        if not value:
            raise typer.BadParameter(f"no value for {key!r}", param_hint="--set")
        if key == "target_modules":
            out[key] = [m.strip() for m in value.split(",") if m.strip()]
        else:
            out[key] = value
    return out


def _exit_for(job: JobBase) -> ExitCode:
    return {JobState.FAILED: ExitCode.FAILED, JobState.CANCELLED: ExitCode.CANCELLED}.get(job.state, ExitCode.OK)


def _run_watch(g: Globals, job_id: str, *, interval: float = 5.0) -> JobBase:
    async def go() -> JobBase:
        async with g.async_client() as client:
            return await watch_job(client, job_id, stdout(), interval=interval)

    return asyncio.run(go())


@jobs_app.command("create")
def jobs_create(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset id to train on.")],
    base_model: Annotated[str, typer.Option("--base-model", help="Hub model name or local model directory.")],
    preset: Annotated[str, typer.Option(help="conservative, balanced or aggressive.")] = "balanced",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a training field: KEY=VALUE, repeatable (e.g. --set lora_rank=8).",
            metavar="KEY=VALUE",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    gpu_type: Annotated[str | None, typer.Option(help="GPU type from the catalog (default H100-80GB).")] = None,
    pricing: Annotated[str | None, typer.Option(help="spot or on_demand.")] = None,
    max_duration: Annotated[
        str | None, typer.Option(help="Fail the job after this long: 90m, 2h, 1h30m, seconds.")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE label, repeatable.", metavar="KEY=VALUE")
    ] = None,
    request_id: Annotated[str | None, typer.Option(help="Idempotency key: repeating it returns the same job.")] = None,
    description: Annotated[str | None, typer.Option(help="Free text, searchable with jobs list --query.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Start it even if an unfinished job trains the same data and config.")
    ] = False,
    acknowledge_oom_risk: Annotated[
        bool,
        typer.Option(
            "--acknowledge-oom-risk", help="Create it even if the estimate says it will likely run out of memory."
        ),
    ] = False,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job live until it ends.")] = False,
) -> None:
    """Create a fine-tuning job and queue it."""
    preset_value = _enum(Preset, preset, "--preset")
    pricing_value = _enum(PricingTier, pricing, "--pricing")
    try:
        duration = parse_duration(max_duration) if max_duration else None
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--max-duration") from None
    overrides = _overrides(set_)
    labels = parse_pairs(label, "--label")
    g = globals_of(ctx)
    with g.client() as client:
        try:
            job = client.jobs.create(
                dataset=dataset,
                base_model=base_model,
                preset=preset_value or Preset.BALANCED,
                name=name,
                gpu_type=gpu_type,
                pricing=pricing_value,
                max_duration=duration,
                labels=labels,
                request_id=request_id,
                acknowledge_oom_risk=acknowledge_oom_risk,
                description=description,
                force=force,
                **overrides,
            )
        except TypeError as e:
            raise typer.BadParameter(str(e), param_hint="--set") from None
    if as_json and not watch:
        print_json(job)
        return
    if not as_json:
        stdout().print(Text.assemble("created ", (job.id, "bold"), "  ", state_text(job.state), f"  {job.name}"))
    if not watch:
        stdout().print(Text(f"follow it with: brightrun jobs watch {job.id}", style="dim"))
        return
    final = _run_watch(g, job.id)
    if as_json:
        print_json(final)
    else:
        print_summary(stdout(), final)
    raise typer.Exit(_exit_for(final))


@jobs_app.command("estimate")
def jobs_estimate(
    ctx: typer.Context,
    base_model: Annotated[str, typer.Option("--base-model", help="Catalog model name or local model directory.")],
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset id (needed for duration and cost).")] = None,
    preset: Annotated[str, typer.Option(help="conservative, balanced or aggressive.")] = "balanced",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a training field: KEY=VALUE, repeatable.", metavar="KEY=VALUE"),
    ] = None,
    gpu_type: Annotated[str | None, typer.Option(help="GPU type from the catalog (default H100-80GB).")] = None,
    pricing: Annotated[str | None, typer.Option(help="spot or on_demand.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Estimate memory (with OOM risk and ranked fixes), duration and cost without creating a job."""
    preset_value = _enum(Preset, preset, "--preset")
    pricing_value = _enum(PricingTier, pricing, "--pricing")
    overrides = _overrides(set_)
    with globals_of(ctx).client() as client:
        try:
            estimate = client.jobs.estimate(
                base_model=base_model,
                dataset=dataset,
                preset=preset_value or Preset.BALANCED,
                gpu_type=gpu_type,
                pricing=pricing_value,
                **overrides,
            )
        except TypeError as e:
            raise typer.BadParameter(str(e), param_hint="--set") from None
    if as_json:
        print_json(estimate)
    else:
        stdout().print(estimate_details(estimate))


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state (e.g. training, failed).")] = None,
    filter: Annotated[
        str | None, typer.Option(help="Filter, e.g. 'preset = BALANCED AND labels.team = \"nlp\"'.")
    ] = None,
    query: Annotated[str | None, typer.Option(help="Only jobs whose name, description or labels contain this.")] = None,
    order_by: Annotated[str | None, typer.Option(help='Sort, e.g. "spend_usd desc" (default: newest first).')] = None,
    limit: Annotated[int | None, typer.Option(help="Show at most this many.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    state_value = _enum(JobState, state, "--state")
    with globals_of(ctx).client() as client:
        jobs = list(client.jobs.list(filter=filter, state=state_value, limit=limit, query=query, order_by=order_by))
    if as_json:
        print_json(jobs)
        return
    if not jobs:
        stderr().print("no jobs")
        return
    table = Table(box=None, padding=(0, 2), header_style="bold")
    for column in ("ID", "NAME", "STATE", "PRESET", "PROGRESS", "LOSS", "EVAL", "SPEND", "CREATED"):
        table.add_column(
            column,
            justify="right" if column in ("PROGRESS", "LOSS", "EVAL", "SPEND") else "left",
            no_wrap=column == "ID",
        )
    for job in jobs:
        p = job.progress
        m = job.latest_metrics
        eval_loss = (
            job.output.final_eval_loss
            if job.output and job.output.final_eval_loss is not None
            else (m.eval_loss if m else None)
        )
        table.add_row(
            job.id,
            job.name,
            state_text(job.state),
            f"{job.preset}" + ("*" if job.custom else ""),
            f"{p.current_step}/{p.total_steps} {p.fraction:.0%}" if p.total_steps else "-",
            fmt_float(m.train_loss if m else None),
            fmt_float(eval_loss),
            fmt_usd(job.cost.spend_usd),
            fmt_ago(job.create_time),
        )
    stdout().print(table)


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], as_json: JsonOpt = False
) -> None:
    """Show a job: stages with durations, progress, latest metrics, cost, failure, output."""
    with globals_of(ctx).client() as client:
        job = client.jobs.get(job_id)
    if as_json:
        print_json(job)
    else:
        stdout().print(job_details(job))


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    reason: Annotated[str, typer.Option(help="Why: " + ", ".join(CancelReason.choices()) + ".")],
    note: Annotated[str, typer.Option(help="Free text, at most 500 characters.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job; a running job stops within 60 s and keeps its partial results."""
    reason_value = _enum(CancelReason, reason, "--reason")
    assert reason_value is not None
    with globals_of(ctx).client() as client:
        job = client.jobs.cancel(job_id, reason=reason_value, note=note)
    if as_json:
        print_json(job)
    else:
        stdout().print(Text.assemble("cancel requested for ", (job.id, "bold"), ": now ", state_text(job.state)))


def _event_line(event: JobEvent) -> Text:
    style = {
        EventType.ERROR: "red",
        EventType.WARNING: "yellow",
        EventType.CHECKPOINT: "cyan",
        EventType.STATUS: "bold",
    }.get(event.type, "")
    text = Text(f"#{event.sequence:<5} ", style="dim")
    text.append(f"{fmt_time(event.time)}  ", style="dim")
    text.append(f"{event.type.label:<10} ", style=style)
    text.append(f"{event.code:<20} ", style="dim")
    text.append(event.message)
    return text


@jobs_app.command("events")
def jobs_events(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    type_: Annotated[
        list[str] | None,
        typer.Option("--type", help="Only this type (status, metrics, warning, error, info, checkpoint); repeatable."),
    ] = None,
    query: Annotated[str | None, typer.Option(help="Only events whose message or code contains this text.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming new events until the job ends.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (payload as JSON).")] = False,
) -> None:
    """Show a job's event log (or follow it live); export it with --json or --csv."""
    types = [_enum(EventType, t, "--type") for t in (type_ or [])]
    out = stdout()
    needle = (query or "").lower()
    writer = csv.writer(sys.stdout, lineterminator="\n") if as_csv else None
    if writer is not None:
        writer.writerow(["sequence", "time", "type", "code", "message", "attempt", "payload"])
    with globals_of(ctx).client() as client:
        source = (
            client.jobs.stream_events(job_id, types=[t for t in types if t is not None])
            if follow
            else client.jobs.list_events(job_id, query=query, types=[t for t in types if t is not None])
        )
        for event in source:
            if follow and needle and needle not in event.message.lower() and needle not in event.code.lower():
                continue
            if writer is not None:
                row = to_jsonable(event)
                fields = ("sequence", "time", "type", "code", "message", "attempt")
                writer.writerow([*("" if row[f] is None else row[f] for f in fields), json.dumps(row["payload"])])
                sys.stdout.flush()
            elif as_json:
                sys.stdout.write(json.dumps(to_jsonable(event)) + "\n")
                sys.stdout.flush()
            else:
                out.print(_event_line(event), soft_wrap=True)


_METRIC_COLUMNS = list(MetricPoint.model_fields)


@jobs_app.command("metrics")
def jobs_metrics(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming new points until the job ends.")
    ] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (every field) instead of a table.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line.")] = False,
) -> None:
    """Show a job's metric history (or follow it live)."""
    with globals_of(ctx).client() as client:
        points = client.jobs.stream_metrics(job_id) if follow else iter(client.jobs.list_metrics(job_id))
        if as_csv:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(_METRIC_COLUMNS)
            for point in points:
                row = point.model_dump(mode="json")
                writer.writerow(["" if row[c] is None else row[c] for c in _METRIC_COLUMNS])
                sys.stdout.flush()
            return
        if as_json:
            for point in points:
                sys.stdout.write(json.dumps(to_jsonable(point)) + "\n")
                sys.stdout.flush()
            return
        out = stdout()
        if follow:
            for point in points:
                out.print(_metric_line(point), soft_wrap=True, markup=False)
            return
        table = Table(box=None, padding=(0, 2), header_style="bold")
        for column in ("STEP", "EPOCH", "TRAIN LOSS", "EVAL LOSS", "LR", "GRAD NORM", "TOK/S", "PEAK MEM"):
            table.add_column(column, justify="right")
        count = 0
        for point in points:
            count += 1
            table.add_row(
                str(point.step),
                f"{point.epoch:.2f}",
                fmt_float(point.train_loss),
                fmt_float(point.eval_loss),
                f"{point.learning_rate:.3g}" if point.learning_rate is not None else "-",
                fmt_float(point.grad_norm, 3),
                f"{point.tokens_per_second:,.0f}" if point.tokens_per_second is not None else "-",
                fmt_bytes(point.memory_peak_bytes),
            )
        if count:
            out.print(table)
        else:
            stderr().print("no metrics yet")


def _metric_line(point: MetricPoint) -> str:
    parts = [f"step {point.step}", f"epoch {point.epoch:.2f}"]
    for name, label in (("train_loss", "loss"), ("eval_loss", "eval"), ("learning_rate", "lr"), ("grad_norm", "grad")):
        value = getattr(point, name)
        if value is not None:
            parts.append(f"{label} {value:.4g}")
    if point.tokens_per_second is not None:
        parts.append(f"{point.tokens_per_second:,.0f} tok/s")
    return "  ".join(parts)


@jobs_app.command("watch")
def jobs_watch(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    interval: Annotated[float, typer.Option(help="Seconds between status lines when not on a terminal.")] = 5.0,
) -> None:
    """Follow a job live: progress, stages, loss trend and sparkline, speed, ETA and spend vs estimate.

    A job recovering, paused or awaiting a decision is shown with what it waits for and the
    command that continues it; the watch goes on until the job ends.
    Exits 0 when the job completed, 1 when it failed, 3 when it was cancelled.
    """
    final = _run_watch(globals_of(ctx), job_id, interval=interval)
    print_summary(stdout(), final)
    raise typer.Exit(_exit_for(final))


@jobs_app.command("wait")
def jobs_wait(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 4).")] = None,
    require: Annotated[
        list[str] | None,
        typer.Option(
            "--require",
            help='Gate on the final job, e.g. "eval_loss<0.5"; repeatable (exit 5 if one fails).',
            metavar="GATE",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final job as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
    wait_for_decision: Annotated[
        bool,
        typer.Option(
            "--wait-for-decision", help="Keep waiting while the job awaits a decision (someone else decides)."
        ),
    ] = False,
) -> None:
    """Wait for a job to end, for CI; exit non-zero when it failed or a gate did not hold.

    Exit codes:
    [bold]0[/]  completed, and every --require gate holds
    [bold]1[/]  the job failed
    [bold]2[/]  usage error (e.g. a malformed --require gate)
    [bold]3[/]  the job was cancelled
    [bold]4[/]  --timeout passed before the job ended
    [bold]5[/]  the job completed but a --require gate did not hold
    [bold]6[/]  the job could not be followed (server unreachable, unknown job)
    [bold]7[/]  the job awaits a decision: automatic recovery gave up (answer with `jobs decide`;
        --wait-for-decision keeps waiting instead)

    Queued, recovering and paused jobs are waited for: they continue without a decision.

    A gate compares a value of the final job with a number using <, <=, >, >=, == or !=:
    eval_loss, train_loss, perplexity (final values), duration_seconds, spend_usd, step, epoch,
    or another metric of the latest point (grad_norm, tokens_per_second, ...).
    """
    try:
        gates = [gates_mod.parse_gate(text) for text in (require or [])]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--require") from None
    g = globals_of(ctx)
    err = stderr()
    with g.client() as client:
        try:
            job = client.jobs.get(job_id)
            last_state: JobState | None = None
            last_line = 0.0
            if not job.is_terminal:
                for snapshot in job.watch(timeout=timeout):
                    # A line per state change, and a progress line at most every
                    # PROGRESS_EVERY seconds, so CI logs show liveness without flooding.
                    now = time.monotonic()
                    changed = snapshot.state != last_state
                    if not quiet and (changed or now - last_line >= PROGRESS_EVERY):
                        p = snapshot.progress
                        step = f" (step {p.current_step}/{p.total_steps})" if p.total_steps else ""
                        err.print(f"{job.id}: {snapshot.state}{step} — {snapshot.state_message}", markup=False)
                        if changed and snapshot.state is JobState.PAUSED:
                            err.print(f"{job.id} is paused: it continues once someone resumes it", markup=False)
                        last_line = now
                    last_state = snapshot.state
                    if snapshot.state is JobState.AWAITING_DECISION and not wait_for_decision:
                        break
        except WaitTimeout as e:
            if not quiet:
                err.print(f"timeout: {e}", markup=False)
            if as_json and e.job is not None:
                print_json(e.job)
            raise typer.Exit(ExitCode.TIMEOUT) from None
        except BrightRunError as e:
            err.print(f"[bold red]error:[/] {error_line(e, g.target)}", markup=True, highlight=False)
            raise typer.Exit(ExitCode.ERROR) from None
    if not quiet:
        print_summary(err, job)
    if job.state is JobState.AWAITING_DECISION:
        if as_json:
            print_json(job)
        raise typer.Exit(ExitCode.DECISION)
    results = gates_mod.evaluate(job, gates) if job.state is JobState.COMPLETED else []
    if not quiet:
        for result in results:
            err.print(Text(result.describe(), style="green" if result.ok else "bold red"))
    if as_json:
        print_json(job)
    code = _exit_for(job)
    if code is ExitCode.OK and not all(r.ok for r in results):
        code = ExitCode.GATE
    raise typer.Exit(code)


# The commands of these modules register on the apps above.
from brightrun.cli import control, keys, queue  # noqa: E402, F401
