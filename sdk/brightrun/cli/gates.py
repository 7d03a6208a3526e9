"""``jobs wait --require "eval_loss<0.5"``: quality gates on a finished job.

A gate compares one value of the final job with a number. Values:

* ``eval_loss``, ``train_loss``, ``perplexity`` — the job's final values
  (``job.output``), else the latest metric point's;
* ``duration_seconds`` — wall time from start to end;
* ``spend_usd`` — what the job cost;
* ``step``, ``epoch`` — where training ended;
* any other metric of the latest point: ``grad_norm``, ``learning_rate``,
  ``tokens_per_second``, ``steps_per_second``, ``memory_peak_bytes``, ...
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from brightrun.types import JobBase, MetricPoint

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}

_FINAL = {"eval_loss": "final_eval_loss", "train_loss": "final_train_loss", "perplexity": "final_perplexity"}
_POINT_METRICS = tuple(
    name
    for name in MetricPoint.model_fields
    if name not in ("sequence", "attempt", "step", "epoch", "time") and name not in _FINAL
)
METRICS: tuple[str, ...] = (
    "eval_loss",
    "train_loss",
    "perplexity",
    "duration_seconds",
    "spend_usd",
    "step",
    "epoch",
    *_POINT_METRICS,
)

_GATE = re.compile(
    r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True, slots=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: Gate
    value: float | None

    @property
    def ok(self) -> bool:
        return self.value is not None and _OPS[self.gate.op](self.value, self.gate.threshold)

    def describe(self) -> str:
        shown = "unavailable" if self.value is None else f"{self.value:g}"
        return f"{'ok  ' if self.ok else 'FAIL'} {self.gate} (actual: {shown})"


def parse_gate(text: str) -> Gate:
    """``"eval_loss<0.5"`` → Gate; ValueError naming the problem."""
    match = _GATE.match(text)
    if match is None:
        raise ValueError(f"cannot read gate {text!r}: expected METRIC OP NUMBER with OP one of <, <=, >, >=, ==, !=")
    metric, op, raw = match.groups()
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} in gate {text!r}; one of {', '.join(METRICS)}")
    return Gate(metric, op, float(raw))


def metric_value(job: JobBase, metric: str) -> float | None:
    """The value a gate on `metric` compares, or None when the job has none."""
    latest = job.latest_metrics
    if metric in _FINAL:
        final = getattr(job.output, _FINAL[metric]) if job.output is not None else None
        if final is not None:
            return float(final)
        value = getattr(latest, metric) if latest is not None else None
        return None if value is None else float(value)
    if metric == "duration_seconds":
        elapsed = job.elapsed
        return None if elapsed is None else elapsed.total_seconds()
    if metric == "spend_usd":
        return job.cost.spend_usd
    if metric == "step":
        return float(job.progress.current_step)
    if metric == "epoch":
        return job.progress.epoch
    value = getattr(latest, metric, None) if latest is not None else None
    return None if value is None else float(value)


def evaluate(job: JobBase, gates: list[Gate]) -> list[GateResult]:
    return [GateResult(gate, metric_value(job, gate.metric)) for gate in gates]
