"""Terminal views of a job: the live ``jobs watch`` panel, its plain-text
fallback for logs and CI, ``jobs show`` details and the end-of-job summary.

Rendering is pure (state in, rich renderable or string out); :func:`watch_job`
feeds the state from two ``AsyncClient`` streams (WatchJob and
StreamJobMetrics) and redraws.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from brightrun.cli._common import fmt_ago, fmt_bytes, fmt_duration, fmt_float, fmt_time, fmt_usd
from brightrun.client import AsyncClient
from brightrun.enums import CostAlert, JobState, OomRisk, ProvisioningOutcome, Stage, StageStatus
from brightrun.types import JobBase, JobEstimate, JobStage, MetricPoint

SPARK_CHARS = "▁▂▃▄▅▆▇█"
#: Metric points kept for the sparkline and the trend.
WINDOW = 400
#: The trend compares the latest loss with the one this many steps earlier.
TREND_STEPS = 10

STATE_STYLE = {
    JobState.QUEUED: "cyan",
    JobState.PROVISIONING: "yellow",
    JobState.PREPROCESSING: "yellow",
    JobState.MODEL_LOADING: "yellow",
    JobState.TRAINING: "bold yellow",
    JobState.FINALIZATION: "yellow",
    JobState.COMPLETED: "bold green",
    JobState.FAILED: "bold red",
    JobState.CANCELLING: "magenta",
    JobState.CANCELLED: "magenta",
    JobState.PAUSING: "blue",
    JobState.PAUSED: "bold blue",
    JobState.RECOVERING: "bold yellow",
    JobState.AWAITING_DECISION: "bold red",
}
_STAGE_ICON = {
    StageStatus.SUCCEEDED: ("✓", "green"),
    StageStatus.RUNNING: ("●", "yellow"),
    StageStatus.FAILED: ("✗", "red"),
    StageStatus.PENDING: ("○", "dim"),
    StageStatus.UNSPECIFIED: ("○", "dim"),
}
_STAGES = [s for s in Stage if s is not Stage.UNSPECIFIED]


def state_text(state: JobState) -> Text:
    return Text(state.label.upper(), style=STATE_STYLE.get(state, ""))


# ------------------------------------------------------------------ pure pieces


def sparkline(values: Sequence[float], width: int = 48) -> str:
    """Unicode sparkline of `values`, averaged into at most `width` buckets."""
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if not finite:
        return ""
    if len(finite) > width:
        buckets: list[float] = []
        size = len(finite) / width
        for i in range(width):
            chunk = finite[int(i * size) : max(int((i + 1) * size), int(i * size) + 1)]
            buckets.append(sum(chunk) / len(chunk))
        finite = buckets
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        return SPARK_CHARS[len(SPARK_CHARS) // 2] * len(finite)
    top = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[round((v - lo) / (hi - lo) * top)] for v in finite)


def loss_trend(points: Sequence[MetricPoint], lookback: int = TREND_STEPS, smooth: int = 5) -> tuple[str, float | None]:
    """(arrow, change) of the train loss now vs ~`lookback` steps before.

    Per-step losses are noisy, so both ends are means over up to `smooth` points.
    """
    with_loss = [p for p in points if p.train_loss is not None]
    if len(with_loss) < 2:
        return "", None
    latest_step = with_loss[-1].step
    recent = with_loss[-smooth:]
    earlier = [p for p in with_loss if p.step <= latest_step - lookback][-smooth:] or with_loss[:1]
    now = sum(p.train_loss or 0.0 for p in recent) / len(recent)
    before = sum(p.train_loss or 0.0 for p in earlier) / len(earlier)
    change = now - before
    if abs(change) / max(abs(before), 1e-9) < 0.005:
        return "→", change
    return ("↓" if change < 0 else "↑"), change


@dataclass
class WatchState:
    """What the live view shows; fed by the job and metric streams."""

    job: JobBase
    received_at: float = field(default_factory=time.monotonic)
    points: deque[MetricPoint] = field(default_factory=lambda: deque(maxlen=WINDOW))
    last_eval: MetricPoint | None = None
    latest: MetricPoint | None = None

    def update_job(self, job: JobBase) -> None:
        self.job = job
        self.received_at = time.monotonic()

    def add_metric(self, point: MetricPoint) -> None:
        self.points.append(point)
        self.latest = point
        if point.eval_loss is not None:
            self.last_eval = point

    def latest_value(self, name: str) -> float | None:
        """The newest value of metric `name` among the recent points (or the job's latest point)."""
        for point in reversed(self.points):
            value = getattr(point, name)
            if value is not None:
                return float(value)
        latest = self.job.latest_metrics
        value = getattr(latest, name) if latest is not None else None
        return None if value is None else float(value)

    def spend_now(self, now: float | None = None) -> float:
        """Spend so far, extrapolated from the last snapshot while a worker runs."""
        job = self.job
        spend = job.cost.spend_usd
        if job.state.is_active:
            spend += max(0.0, (now or time.monotonic()) - self.received_at) / 3600 * job.cost.hourly_rate_usd
        return spend

    def elapsed(self) -> timedelta | None:
        return self.job.elapsed

    def eta(self) -> timedelta | None:
        eta = self.job.progress.eta
        if eta is None or self.job.state is not JobState.TRAINING:
            return eta
        return max(timedelta(0), eta - timedelta(seconds=time.monotonic() - self.received_at))


def stage_strip(job: JobBase) -> Text:
    by_stage: dict[Stage, JobStage] = {}
    for recorded in job.stages:
        by_stage[recorded.stage] = recorded
    text = Text()
    for i, stage in enumerate(_STAGES):
        entry = by_stage.get(stage)
        status = entry.status if entry is not None else StageStatus.PENDING
        icon, style = _STAGE_ICON.get(status, ("○", "dim"))
        if i:
            text.append("  ")
        text.append(f"{icon} {stage.label}", style=style)
        if entry is not None and entry.duration is not None and status is not StageStatus.PENDING:
            text.append(f" {fmt_duration(entry.duration)}", style="dim")
    return text


def _sub_status(job: JobBase) -> str:
    """The running stage's latest sub-status message, else the job's state message."""
    current = job.current_stage
    if current is not None and current.status is StageStatus.RUNNING and current.message:
        return current.message
    return job.state_message


# ------------------------------------------------------------------ recovery, queue and cost lines

ALERT_STYLE = {CostAlert.WARNING: "bold yellow", CostAlert.OVER_ESTIMATE: "bold red"}
ALERT_TEXT = {CostAlert.WARNING: "above 80% of the estimate", CostAlert.OVER_ESTIMATE: "OVER THE ESTIMATE"}


def cost_vs_estimate(job: JobBase) -> Text | None:
    """``45% of the estimate ($1.20 to $2.40)``, styled by the cost alert; None when not estimated."""
    c = job.cost
    if c.estimate_usd is None:
        return None
    text = Text(
        f"{c.percent_of_estimate:.0f}% of the estimate ({fmt_usd(c.estimate_usd.low)} to "
        f"{fmt_usd(c.estimate_usd.high)})",
        style=ALERT_STYLE.get(c.alert, "dim"),
    )
    if c.alert in ALERT_TEXT:
        text.append(f"  ⚠ {ALERT_TEXT[c.alert]}", style=ALERT_STYLE[c.alert])
    return text


def interruptions_summary(job: JobBase) -> str | None:
    """``interrupted 2 times (auto-recovered), $0.03 overhead`` (with a multiplication
    sign); None without interruptions."""
    if not job.interruptions:
        return None
    n = len(job.interruptions)
    recovered = sum(1 for i in job.interruptions if i.recovered)
    how = "auto-recovered" if recovered == n else f"{recovered} auto-recovered"
    text = f"interrupted {n}× ({how})"  # noqa: RUF001 - the times sign, as the dashboard shows it
    overhead = sum(i.cost_overhead_usd for i in job.interruptions)
    if overhead:
        text += f", {fmt_usd(overhead)} overhead"
    return text


def provisioning_line(job: JobBase) -> str | None:
    """Where acquiring compute stands, while it matters."""
    p = job.provisioning
    if p is None or (p.attempt == 0 and job.state is not JobState.PROVISIONING):
        return None
    parts = [f"attempt {p.attempt}/{p.max_attempts}" if p.max_attempts else f"attempt {p.attempt}"]
    if p.pool:
        parts.append(f"pool {p.pool}")
    if p.last_outcome is not ProvisioningOutcome.UNSPECIFIED:
        parts.append(f"last: {p.last_outcome.label}")
    if p.next_attempt_time is not None and job.state is JobState.PROVISIONING:
        parts.append(f"next try {fmt_time(p.next_attempt_time)}")
    return ", ".join(parts)


def queue_line(job: JobBase) -> str | None:
    q = job.queue
    if q is None or not q.position:
        return None
    text = f"position {q.position}"
    if q.estimated_start_time is not None:
        text += f", expected start {fmt_time(q.estimated_start_time)}"
    if q.confidence:
        text += f" ({q.confidence} confidence)"
    if job.promote_time is not None:
        text += ", promoted"
    return text


def status_banner(job: JobBase) -> Text | None:
    """The line that says what a job waits for and what to do about it:
    RECOVERING, AWAITING_DECISION, PAUSING / PAUSED, QUEUED, PROVISIONING."""
    state = job.state
    if state is JobState.RECOVERING:
        text = Text("⟳ RECOVERING ", style="bold yellow")
        r = job.recovery
        if r is not None and r.failure_class:
            text.append(f"from {r.failure_class.label}: ", style="yellow")
        text.append(job.state_message)
        if r is not None and r.next_attempt_time is not None:
            text.append(f" (next attempt {fmt_time(r.next_attempt_time)})", style="dim")
        return text
    if state is JobState.AWAITING_DECISION:
        text = Text("⚠ AWAITING DECISION ", style="bold red")
        d = job.decision
        text.append((d.reason if d is not None else "") or job.state_message)
        choices = "|".join(str(c) for c in d.choices) if d is not None and d.choices else "CHOICE"
        text.append(f"\n  decide with: brightrun jobs decide {job.id} {choices}", style="bold")
        return text
    if state is JobState.PAUSING:
        return Text("⏸ PAUSING: writing a checkpoint, then the worker stops", style="blue")
    if state is JobState.PAUSED:
        text = Text("⏸ PAUSED ", style="bold blue")
        text.append(job.state_message)
        text.append(f"\n  resume with: brightrun jobs resume {job.id} [--gpu-type T] [--pricing P]", style="bold")
        return text
    if state is JobState.QUEUED and (line := queue_line(job)):
        return Text(f"queued: {line}", style="cyan")
    p = job.provisioning
    retrying = p is not None and (
        p.attempt > 1 or p.last_outcome not in (ProvisioningOutcome.UNSPECIFIED, ProvisioningOutcome.PROVISIONED)
    )
    if state is JobState.PROVISIONING and retrying and (line := provisioning_line(job)):
        return Text(f"provisioning: {line}", style="yellow")
    return None


def render(state: WatchState) -> RenderableType:
    """The live panel."""
    job = state.job
    title = Text()
    title.append(job.name or job.id, style="bold")
    title.append(f"  {job.id}", style="dim")

    header = Text()
    header.append_text(state_text(job.state))
    header.append("   ")
    cfg = job.config
    parts = [f"preset {job.preset}" + (" (custom)" if job.custom else "")]
    if cfg.lora_rank is not None:
        parts.append(f"r={cfg.lora_rank}")
    if cfg.learning_rate is not None:
        parts.append(f"lr {cfg.learning_rate:g}")
    parts.append(f"{job.compute.gpu_type or '-'} {job.compute.pricing_tier}")
    if job.attempt_count > 1:
        parts.append(f"attempt {job.attempt_count}")
    header.append(" · ".join(parts), style="dim")

    progress = job.progress
    total = progress.total_steps
    bar_line = Table.grid(padding=(0, 2))
    bar_line.add_column(width=42)
    bar_line.add_column()
    bar = ProgressBar(total=float(total) if total else None, completed=float(progress.current_step), width=42)
    if job.state is JobState.COMPLETED and total:
        bar = ProgressBar(total=float(total), completed=float(total), width=42)
    step_text = (
        f"step {progress.current_step}/{total}  {progress.fraction:.0%}" if total else "waiting for the first step"
    )
    eta = state.eta()
    if eta is not None and not job.is_terminal:
        step_text += f"   ETA {fmt_duration(eta)}"
    bar_line.add_row(bar, Text(step_text))

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    loss = state.latest_value("train_loss")
    arrow, change = loss_trend(list(state.points))
    loss_text = Text(fmt_float(loss))
    if arrow:
        style = {"↓": "green", "↑": "red"}.get(arrow, "dim")
        loss_text.append(f" {arrow}", style=f"bold {style}")
        if change is not None:
            loss_text.append(f" {change:+.4f} vs {TREND_STEPS} steps ago", style="dim")
    grid.add_row("train loss", loss_text)
    eval_point = state.last_eval
    eval_loss = eval_point.eval_loss if eval_point is not None else state.latest_value("eval_loss")
    eval_text = Text(fmt_float(eval_loss))
    if eval_point is not None:
        eval_text.append(f"  at step {eval_point.step}", style="dim")
        if eval_point.perplexity is not None:
            eval_text.append(f" · perplexity {eval_point.perplexity:.2f}", style="dim")
    grid.add_row("eval loss", eval_text)
    spark = sparkline([p.train_loss for p in state.points if p.train_loss is not None])
    grid.add_row("loss", Text(spark or "-", style="cyan"))
    tps = state.latest_value("tokens_per_second")
    sps = state.latest_value("steps_per_second")
    grid.add_row(
        "speed",
        Text(
            f"{tps:,.0f} tok/s" if tps is not None else "-",
        ).append(f" · {sps:.2f} steps/s" if sps is not None else ""),
    )
    mem = state.latest_value("memory_peak_bytes")
    if mem is not None:
        grid.add_row("memory", Text(f"{fmt_bytes(int(mem))} peak"))
    grid.add_row("elapsed", Text(fmt_duration(state.elapsed())))
    cost = job.cost
    spend = Text(fmt_usd(state.spend_now()))
    if cost.projected_usd and not job.is_terminal:
        spend.append(f" · projected {fmt_usd(cost.projected_usd)}", style="dim")
    if cost.hourly_rate_usd:
        spend.append(f" · ${cost.hourly_rate_usd:.2f}/h", style="dim")
    grid.add_row("spend", spend)
    versus = cost_vs_estimate(job)
    if versus is not None:
        grid.add_row("vs estimate", versus)
    interrupted = interruptions_summary(job)
    if interrupted:
        grid.add_row("interruptions", Text(interrupted, style="yellow"))

    sub = _sub_status(job)
    body: list[RenderableType] = [header, bar_line, stage_strip(job)]
    banner = status_banner(job)
    if banner is not None:
        body.append(banner)
    elif sub:
        body.append(Text(sub, style="italic"))
    body.append(grid)
    if job.failure is not None:
        body.append(Text(f"failed ({job.failure.failure_class}): {job.failure.reason}", style="red"))
    return Panel(Group(*body), title=title, title_align="left", border_style=STATE_STYLE.get(job.state, "blue"))


def plain_status(state: WatchState) -> str:
    """One line for logs and CI (no colours, no cursor movement)."""
    job = state.job
    parts = [f"[{fmt_duration(state.elapsed()) if job.start_time else '-'}]", f"{job.state}"]
    progress = job.progress
    if progress.total_steps:
        parts.append(f"step {progress.current_step}/{progress.total_steps} ({progress.fraction:.0%})")
    loss = state.latest_value("train_loss")
    if loss is not None:
        arrow, _ = loss_trend(list(state.points))
        parts.append(f"loss {loss:.4f}{(' ' + arrow) if arrow else ''}")
    eval_loss = state.latest_value("eval_loss")
    if eval_loss is not None:
        parts.append(f"eval {eval_loss:.4f}")
    tps = state.latest_value("tokens_per_second")
    if tps is not None:
        parts.append(f"{tps:,.0f} tok/s")
    eta = state.eta()
    if eta is not None and not job.is_terminal:
        parts.append(f"ETA {fmt_duration(eta)}")
    spend = f"spend {fmt_usd(state.spend_now())}"
    cost = job.cost
    if cost.estimate_usd is not None:
        spend += f" ({cost.percent_of_estimate:.0f}% of est.)"
    if cost.alert in ALERT_TEXT:
        spend += f" {ALERT_TEXT[cost.alert].upper()}"
    parts.append(spend)
    if job.interruptions:
        parts.append(interruptions_summary(job) or "")
    banner = status_banner(job)
    if banner is not None:
        parts.append(banner.plain.replace("\n  ", " — "))
    return "  ".join(parts)


def summary_lines(job: JobBase) -> list[tuple[str, str]]:
    """(text, style) lines summarising a terminal job."""
    lines: list[tuple[str, str]] = []
    elapsed = fmt_duration(job.elapsed)
    if job.state is JobState.COMPLETED:
        lines.append((f"✓ Job {job.id} completed in {elapsed}", "bold green"))
    elif job.state is JobState.FAILED:
        lines.append((f"✗ Job {job.id} failed after {elapsed}", "bold red"))
    elif job.state is JobState.CANCELLED:
        lines.append((f"■ Job {job.id} was cancelled after {elapsed}", "bold magenta"))
    else:
        lines.append((f"Job {job.id} is {job.state}", "bold"))
        banner = status_banner(job)
        if banner is not None:
            lines.append(("  " + banner.plain, "bold red" if job.state is JobState.AWAITING_DECISION else ""))
    out = job.output
    latest = job.latest_metrics
    train = out.final_train_loss if out and out.final_train_loss is not None else (latest and latest.train_loss)
    evl = out.final_eval_loss if out and out.final_eval_loss is not None else (latest and latest.eval_loss)
    ppl = out.final_perplexity if out and out.final_perplexity is not None else (latest and latest.perplexity)
    metrics = []
    if train is not None:
        metrics.append(f"train loss {train:.4f}")
    if evl is not None:
        metrics.append(f"eval loss {evl:.4f}")
    if ppl is not None:
        metrics.append(f"perplexity {ppl:.2f}")
    if metrics:
        lines.append(("  " + " · ".join(metrics), ""))
    if job.progress.total_steps:
        lines.append((f"  steps {job.progress.current_step}/{job.progress.total_steps}", "dim"))
    if out is not None and out.adapter_path:
        lines.append((f"  adapter: {out.adapter_path}", "bold"))
    if job.failure is not None:
        f = job.failure
        lines.append((f"  reason ({f.failure_class}): {f.reason}", "red"))
        if f.message and f.message != f.reason:
            lines.append((f"  {f.message[:400]}", "red"))
        if f.stage is not Stage.UNSPECIFIED:
            lines.append((f"  in stage {f.stage.label} at step {f.step}", "dim"))
    if job.cancellation is not None:
        c = job.cancellation
        lines.append((f"  reason: {c.reason.label}" + (f" — {c.note}" if c.note else ""), ""))
    cost = job.cost
    lines.append(
        (
            f"  cost: {fmt_usd(cost.spend_usd)} ({fmt_duration(cost.billed_seconds)} billed at "
            f"${cost.hourly_rate_usd:.2f}/h {job.compute.pricing_tier})",
            "dim",
        )
    )
    versus = cost_vs_estimate(job)
    if versus is not None:
        lines.append((f"  {versus.plain}", ALERT_STYLE.get(cost.alert, "dim")))
    interrupted = interruptions_summary(job)
    if interrupted:
        lines.append((f"  {interrupted}", "yellow"))
    return lines


def print_summary(console: Console, job: JobBase) -> None:
    for text, style in summary_lines(job):
        console.print(Text(text, style=style))


def job_details(job: JobBase) -> RenderableType:
    """``jobs show``: everything about one job."""
    info = Table.grid(padding=(0, 2))
    info.add_column(style="dim", justify="right")
    info.add_column()
    banner = status_banner(job)
    if banner is not None and job.state in (JobState.PAUSED, JobState.AWAITING_DECISION, JobState.RECOVERING):
        info.add_row("state", banner)  # the state, why, and the command that continues the job
    else:
        info.add_row("state", state_text(job.state).append(f"  {job.state_message}", style="italic"))
    if (line := queue_line(job)) is not None:
        info.add_row("queue", line)
    if (line := provisioning_line(job)) is not None:
        info.add_row("provisioning", line)
    for i, warning in enumerate(job.warnings):
        info.add_row("warnings" if i == 0 else "", Text(warning, style="yellow"))
    info.add_row("dataset", job.dataset_id)
    info.add_row("base model", job.base_model)
    info.add_row("preset", f"{job.preset}" + (" (custom)" if job.custom else ""))
    info.add_row(
        "compute",
        f"{job.compute.gpu_type} {job.compute.pricing_tier}, max {fmt_duration(job.compute.max_duration)}",
    )
    info.add_row("created", fmt_time(job.create_time))
    info.add_row("started", fmt_time(job.start_time))
    info.add_row("ended", fmt_time(job.end_time))
    info.add_row("elapsed", fmt_duration(job.elapsed))
    info.add_row("attempts", str(job.attempt_count))
    if job.labels:
        info.add_row("labels", ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items())))
    p = job.progress
    if p.total_steps:
        progress_text = (
            f"step {p.current_step}/{p.total_steps} ({p.fraction:.0%}), epoch {p.epoch:.2f}/{p.total_epochs}"
        )
        if p.eta is not None and not job.is_terminal:
            progress_text += f", ETA {fmt_duration(p.eta)}"
        info.add_row("progress", progress_text)
    c = job.cost
    info.add_row(
        "cost",
        f"{fmt_usd(c.spend_usd)} spent"
        + (f", {fmt_usd(c.projected_usd)} projected" if c.projected_usd and not job.is_terminal else "")
        + f" (${c.hourly_rate_usd:.2f}/h, {fmt_duration(c.billed_seconds)} billed)"
        + (f", {fmt_usd(c.overhead_usd)} lost to interruptions" if c.overhead_usd else ""),
    )
    versus = cost_vs_estimate(job)
    if versus is not None:
        info.add_row("vs estimate", versus)
    if job.promote_time is not None:
        info.add_row("promoted", f"{fmt_time(job.promote_time)} ({fmt_ago(job.promote_time)})")
    if job.latest_checkpoint is not None:
        ck = job.latest_checkpoint
        info.add_row("checkpoint", f"{ck.id} at step {ck.step} ({job.checkpoint_count} in total)")

    cfg = Table.grid(padding=(0, 2))
    cfg.add_column(style="dim", justify="right")
    cfg.add_column()
    for name, value in job.config.overrides().items():
        shown = ", ".join(value) if isinstance(value, tuple) else str(value)
        cfg.add_row(name, shown)

    stages = Table(title="stages", title_justify="left", show_edge=False, box=None, padding=(0, 2))
    stages.add_column("stage")
    stages.add_column("status")
    stages.add_column("duration", justify="right")
    stages.add_column("message")
    for entry in job.stages:
        icon, style = _STAGE_ICON.get(entry.status, ("○", "dim"))
        stages.add_row(
            entry.stage.label,
            Text(f"{icon} {entry.status}", style=style),
            fmt_duration(entry.duration) if entry.duration is not None else "-",
            entry.message,
        )

    parts: list[RenderableType] = [info]
    if job.stages:
        parts += [Text(""), stages]
    m = job.latest_metrics
    if m is not None:
        metrics = Table(title=f"latest metrics (step {m.step})", title_justify="left", box=None, padding=(0, 2))
        metrics.add_column("metric", style="dim")
        metrics.add_column("value", justify="right")
        for name in ("train_loss", "eval_loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_second"):
            value = getattr(m, name)
            if value is not None:
                metrics.add_row(name, f"{value:.6g}")
        for name in ("memory_used_bytes", "memory_peak_bytes"):
            value = getattr(m, name)
            if value is not None:
                metrics.add_row(name, fmt_bytes(value))
        parts += [Text(""), metrics]
    parts += [Text(""), Text("configuration", style="bold"), cfg]
    if job.output is not None:
        o = job.output
        parts += [Text(""), Text("output", style="bold green")]
        out = Table.grid(padding=(0, 2))
        out.add_column(style="dim", justify="right")
        out.add_column()
        out.add_row("adapter", o.adapter_path)
        out.add_row("artifact", o.artifact_id)
        out.add_row("eval loss", fmt_float(o.final_eval_loss))
        out.add_row("train loss", fmt_float(o.final_train_loss))
        out.add_row("perplexity", fmt_float(o.final_perplexity, 2))
        out.add_row("duration", fmt_duration(o.duration))
        parts.append(out)
    if job.failure is not None:
        f = job.failure
        parts += [Text(""), Text(f"failure: {f.failure_class}", style="bold red")]
        fail_grid = Table.grid(padding=(0, 2))
        fail_grid.add_column(style="dim", justify="right")
        fail_grid.add_column()
        fail_grid.add_row("reason", f.reason)
        if f.message:
            fail_grid.add_row("message", f.message)
        fail_grid.add_row("where", f"{f.stage.label}, step {f.step}")
        fail_grid.add_row("retryable", "yes" if f.retryable else "no")
        if f.exception_type:
            fail_grid.add_row("exception", f.exception_type)
        if f.exit_code is not None or f.signal is not None:
            fail_grid.add_row("exit", f"code {f.exit_code}" if f.exit_code is not None else f"signal {f.signal}")
        parts.append(fail_grid)
        if f.log_tail:
            parts += [Text("log tail:", style="dim"), Text("\n".join(f.log_tail[-12:]), style="dim")]
    parts += _recovery_parts(job)
    if job.estimate is not None:
        parts += [Text(""), Text("estimate at creation", style="bold"), estimate_details(job.estimate)]
    if job.cancellation is not None:
        cancel = job.cancellation
        parts += [
            Text(""),
            Text(f"cancelled: {cancel.reason.label}" + (f" — {cancel.note}" if cancel.note else ""), style="magenta"),
        ]
    title = Text(job.name or job.id, style="bold")
    title.append(f"  {job.id}", style="dim")
    return Panel(
        Group(*parts), title=title, title_align="left", border_style=STATE_STYLE.get(job.state, "blue"), expand=False
    )


def _recovery_parts(job: JobBase) -> list[RenderableType]:
    """Recovery status, pending decision, interruptions and lineage, when there are any."""
    parts: list[RenderableType] = []
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    r = job.recovery
    if r is not None and (job.state is JobState.RECOVERING or r.recovered_count or r.consecutive_failures):
        line = (
            f"{r.recovered_count} recovered, {r.consecutive_failures} failing in a row, "
            f"{r.retries_remaining} retries left"
        )
        if job.state is JobState.RECOVERING and r.next_attempt_time is not None:
            line += f"; next attempt at {fmt_time(r.next_attempt_time)} after {r.failure_class.label}"
        grid.add_row("recovery", line)
    d = job.decision
    if d is not None and job.state is JobState.AWAITING_DECISION:
        decision = Text(f"choose: {', '.join(str(c) for c in d.choices)}", style="bold red")
        if d.since is not None:
            decision.append(f" (waiting since {fmt_time(d.since)}, {fmt_ago(d.since)})", style="dim")
        grid.add_row("decision", decision)
    if job.paused_duration:
        grid.add_row("paused", fmt_duration(job.paused_duration))
    lin = job.lineage
    if lin is not None:
        if lin.retry_of:
            grid.add_row("retry of", f"{lin.retry_of} (retry #{lin.retry_number})")
        if lin.resumed_from_job_id:
            grid.add_row("resumed from", f"{lin.resumed_from_job_id} at {lin.resumed_from_checkpoint_id}")
        if lin.applied_fixes:
            grid.add_row("fixes", ", ".join(lin.applied_fixes))
        if lin.root_job_id and lin.root_job_id != job.id:
            grid.add_row("chain", f"root {lin.root_job_id}, {fmt_usd(lin.chain_spend_usd)} spent in total")
        elif lin.chain_spend_usd > job.cost.spend_usd:
            grid.add_row("chain", f"{fmt_usd(lin.chain_spend_usd)} spent with its retries and continuations")
    if grid.row_count:
        parts += [Text(""), grid]
    if job.interruptions:
        title = f"interruptions: {interruptions_summary(job)}"
        table = Table(title=title, title_justify="left", box=None, padding=(0, 2), header_style="bold")
        for column in ("attempt", "step", "class", "downtime", "steps lost", "overhead", "recovered"):
            table.add_column(column, justify="right" if column in ("step", "steps lost", "overhead") else "left")
        for i in job.interruptions:
            table.add_row(
                str(i.attempt),
                str(i.step),
                i.failure_class.label,
                fmt_duration(i.downtime),
                str(i.steps_lost),
                fmt_usd(i.cost_overhead_usd),
                "yes" if i.recovered else "no",
            )
        parts += [Text(""), table]
    return parts


RISK_STYLE = {OomRisk.LOW: "green", OomRisk.MODERATE: "yellow", OomRisk.HIGH: "bold red"}


def estimate_details(estimate: JobEstimate) -> RenderableType:
    """``jobs estimate`` / ``jobs show``: memory breakdown, risk, fixes, duration, cost."""
    parts: list[RenderableType] = []
    head = Text()
    head.append(f"{estimate.model} on {estimate.gpu_type}", style="bold")
    head.append(f" ({estimate.device})  ", style="dim")
    head.append(f"OOM risk {estimate.oom_risk.label.upper()}", style=RISK_STYLE.get(estimate.oom_risk, ""))
    parts.append(head)
    memory = Table(box=None, padding=(0, 2), header_style="bold")
    memory.add_column("memory")
    memory.add_column("estimate", justify="right")
    memory.add_column("how", style="dim")
    for line in estimate.memory:
        memory.add_row(line.name, fmt_bytes(line.bytes), line.formula)
    memory.add_row(
        Text("total", style="bold"),
        Text(fmt_bytes(estimate.total_bytes), style="bold"),
        f"{estimate.utilization:.0%} of {fmt_bytes(estimate.capacity_bytes)}"
        + (f", {fmt_bytes(estimate.shortage_bytes)} short" if estimate.shortage_bytes else ""),
    )
    parts.append(memory)
    parts.append(Text(f"{estimate.trainable_parameters:,} trainable parameters", style="dim"))
    if estimate.fixes:
        fixes = Table(title="suggested fixes", title_justify="left", box=None, padding=(0, 2), header_style="bold")
        fixes.add_column("#", justify="right")
        fixes.add_column("fix")
        fixes.add_column("after", justify="right")
        fixes.add_column("risk")
        fixes.add_column("trade-off", style="dim")
        for i, fix in enumerate(estimate.fixes, 1):
            fixes.add_row(
                str(i),
                fix.title,
                fmt_bytes(fix.predicted_total_bytes),
                Text(fix.predicted_risk.label, style=RISK_STYLE.get(fix.predicted_risk, "")),
                fix.tradeoff,
            )
        parts.append(fixes)
    if estimate.duration is not None:
        d = estimate.duration
        parts.append(
            Text(
                f"duration {d.hours.low:.2f} to {d.hours.high:.2f} h ({d.optimizer_steps:,} steps, "
                f"{d.tokens_per_second.low:,.0f} to {d.tokens_per_second.high:,.0f} tok/s)"
            )
        )
    for cost in (estimate.cost_spot, estimate.cost_on_demand):
        if cost is not None:
            parts.append(
                Text(
                    f"cost {cost.pricing_tier.label}: {fmt_usd(cost.total_usd.low)} to {fmt_usd(cost.total_usd.high)}"
                    f" at ${cost.usd_per_hour:.2f}/h"
                )
            )
    return Group(*parts)


# ------------------------------------------------------------------ the live driver


async def watch_job(
    client: AsyncClient,
    job_id: str,
    console: Console,
    *,
    live: bool | None = None,
    interval: float = 5.0,
    refresh_per_second: float = 4.0,
) -> JobBase:
    """Follow a job until it is terminal, drawing the live panel on a terminal
    (or printing a plain line every `interval` seconds and on every state
    change otherwise); return the final job."""
    job = await client.jobs.get(job_id)
    state = WatchState(job)
    use_live = console.is_terminal if live is None else live
    changed = asyncio.Event()

    async def follow_job() -> None:
        async for snapshot in job.watch():
            state.update_job(snapshot)
            changed.set()

    async def follow_metrics() -> None:
        async for point in client.jobs.stream_metrics(job_id, from_sequence=_backfill_from(job)):
            state.add_metric(point)

    tasks = [asyncio.create_task(follow_job()), asyncio.create_task(follow_metrics())]
    try:
        if use_live:
            with Live(render(state), console=console, refresh_per_second=refresh_per_second, transient=False) as view:
                while not tasks[0].done():
                    view.update(render(state))
                    await _wait_any(tasks, 1 / refresh_per_second)
                view.update(render(state))
        else:
            last_line = 0.0
            last_state: JobState | None = None
            last_stage_msg = ""
            while True:
                now = time.monotonic()
                msg = _sub_status(state.job)
                if state.job.state != last_state or msg != last_stage_msg:
                    note = f": {msg}" if msg else ""
                    console.print(f"{state.job.state.label}{note}", soft_wrap=True, highlight=False, markup=False)
                    last_state, last_stage_msg = state.job.state, msg
                if now - last_line >= interval or tasks[0].done():
                    console.print(plain_status(state), soft_wrap=True, highlight=False, markup=False)
                    last_line = now
                if tasks[0].done():
                    break
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=min(interval, 1.0))
        await tasks[0]
        # The metric stream ends once every point of the terminal job arrived.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(tasks[1]), timeout=10)
        if tasks[1].done():
            tasks[1].result()
        return state.job
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _backfill_from(job: JobBase) -> int:
    """Start the metric stream a window before the end, so the sparkline and the
    trend have history without replaying a long job's every point."""
    return max(0, job.last_metric_sequence - WINDOW + 1)


async def _wait_any(tasks: list[asyncio.Task[None]], seconds: float) -> None:
    """Sleep up to `seconds`, waking early when a task ends; re-raise its error."""
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    else:
        await asyncio.sleep(seconds)
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
