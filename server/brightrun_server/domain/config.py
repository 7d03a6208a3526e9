"""Presets, overrides and their allowed ranges; the resolved configuration.

A job's configuration is a preset plus overrides. Resolution validates every
override against its allowed range (collecting one violation per bad field,
never stopping at the first), fills the rest from the preset, and yields the
trainer's :class:`~brightrun_trainer.spec.TrainingParams` — the one definition
of a resolved configuration, shared by the server, the estimator and the trainer.

Preset values and ranges come from SPEC.md §2 (seed P03 / FR3.1.1):
Conservative r=8, lr=1e-4, 2 epochs; Balanced r=16, lr=2e-4, 3 epochs;
Aggressive r=32, lr=5e-4, 5 epochs; alpha = 2r, dropout 0.05, batch size 4,
warmup ratio 0.03, max sequence length 2048, cosine schedule.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from brightrun_server.domain.errors import FieldViolation, InvalidArgument
from brightrun_trainer.spec import LrSchedule, QuantizationMode, TrainingParams


class PresetName(StrEnum):
    CONSERVATIVE = "conservative"
    BALANCED = "balanced"
    AGGRESSIVE = "aggressive"


_COMMON: dict[str, Any] = {
    "lora_dropout": 0.05,
    "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.03,
    "max_seq_length": 2048,
    "lr_scheduler": LrSchedule.COSINE,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 42,
    "quantization": QuantizationMode.NONE,
    "checkpoint_interval_steps": 100,
    "validation_split": 0.2,
    "gradient_checkpointing": False,
    "max_steps": 0,
    "eval_interval_steps": 0,
}

PRESETS: dict[PresetName, TrainingParams] = {
    PresetName.CONSERVATIVE: TrainingParams(**_COMMON, lora_rank=8, lora_alpha=16, learning_rate=1e-4, epochs=2),
    PresetName.BALANCED: TrainingParams(**_COMMON, lora_rank=16, lora_alpha=32, learning_rate=2e-4, epochs=3),
    PresetName.AGGRESSIVE: TrainingParams(**_COMMON, lora_rank=32, lora_alpha=64, learning_rate=5e-4, epochs=5),
}

DEFAULT_PRESET = PresetName.BALANCED


@dataclass(frozen=True, slots=True)
class Range:
    """An allowed interval; `lo_open` excludes the lower bound."""

    lo: float
    hi: float
    integer: bool = False
    lo_open: bool = False

    def check(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {type(value).__name__}"
        if self.integer and not float(value).is_integer():
            return f"must be a whole number, got {value}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        if low_ok and value <= self.hi:
            return None
        return f"must be {self.describe()}, got {_fmt(value)}"

    def describe(self) -> str:
        if self.lo_open:
            return f"above {_fmt(self.lo)} and at most {_fmt(self.hi)}"
        return f"between {_fmt(self.lo)} and {_fmt(self.hi)}"


@dataclass(frozen=True, slots=True)
class OneOf:
    """An allowed set of values."""

    values: tuple[int, ...]

    def check(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value not in self.values:
            return f"must be {self.describe()}, got {_fmt(value)}"
        return None

    def describe(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


#: Allowed values per field. The keys are the override field names.
RANGES: dict[str, Range | OneOf] = {
    "lora_rank": Range(4, 64, integer=True),
    "lora_alpha": Range(8, 128, integer=True),
    "lora_dropout": Range(0.0, 0.2),
    "learning_rate": Range(0.0, 1e-2, lo_open=True),
    "epochs": Range(1, 10, integer=True),
    "batch_size": OneOf((1, 2, 4, 8)),
    "gradient_accumulation_steps": Range(1, 64, integer=True),
    "warmup_ratio": Range(0.0, 0.1),
    "max_seq_length": OneOf((512, 1024, 2048, 4096)),
    "weight_decay": Range(0.0, 1.0),
    "max_grad_norm": Range(0.0, 100.0),
    "seed": Range(0, 2**31 - 1, integer=True),
    "checkpoint_interval_steps": Range(1, 100_000, integer=True),
    "validation_split": Range(0.0, 0.5),
    "max_steps": Range(0, 10_000_000, integer=True),
    "eval_interval_steps": Range(0, 1_000_000, integer=True),
}

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
MAX_TARGET_MODULES = 32

#: Fields that change what is trained; the fingerprint hashes exactly these.
_FINGERPRINT_EXCLUDES = frozenset({"checkpoint_interval_steps", "eval_interval_steps"})


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """A preset with overrides applied and validated."""

    preset: PresetName
    params: TrainingParams
    #: True when any field differs from the preset's value.
    custom: bool


def resolve(
    preset: PresetName | None,
    overrides: Mapping[str, Any],
    *,
    field_prefix: str = "overrides",
) -> ResolvedConfig:
    """Apply overrides to a preset; raise InvalidArgument naming every bad field.

    `overrides` maps TrainingParams field names to values; absent keys keep the
    preset's value. `lora_alpha` follows the rank (alpha = 2r) unless overridden.
    """
    chosen = preset or DEFAULT_PRESET
    base = PRESETS[chosen]
    violations: list[FieldViolation] = []
    values: dict[str, Any] = {}
    for name, value in overrides.items():
        path = f"{field_prefix}.{name}"
        if name == "target_modules":
            modules = tuple(value)
            problem = _check_modules(modules)
            if problem:
                violations.append(FieldViolation(path, problem))
            elif modules:
                values[name] = modules
            continue
        if name == "lr_scheduler":
            values[name] = LrSchedule(value)
            continue
        if name == "quantization":
            values[name] = QuantizationMode(value)
            continue
        if name == "gradient_checkpointing":
            values[name] = bool(value)
            continue
        rule = RANGES.get(name)
        if rule is None:
            violations.append(FieldViolation(path, "is not a configurable field"))
            continue
        problem = rule.check(value)
        if problem:
            violations.append(FieldViolation(path, problem))
        else:
            values[name] = int(value) if isinstance(rule, OneOf) or rule.integer else float(value)
    if "lora_rank" in values and "lora_alpha" not in values:
        values["lora_alpha"] = 2 * values["lora_rank"]
    if violations:
        raise InvalidArgument(violations)
    params = base.model_copy(update=values)
    custom = any(getattr(params, k) != getattr(base, k) for k in values)
    return ResolvedConfig(preset=chosen, params=params, custom=custom)


def _check_modules(modules: tuple[str, ...]) -> str | None:
    if len(modules) > MAX_TARGET_MODULES:
        return f"must list at most {MAX_TARGET_MODULES} modules, got {len(modules)}"
    for module in modules:
        if not _MODULE_NAME.match(module):
            return f"module names must match {_MODULE_NAME.pattern}, got {module!r}"
    if len(set(modules)) != len(modules):
        return "must not repeat a module"
    return None


def fingerprint(dataset_sha256: str, base_model: str, params: TrainingParams) -> str:
    """Hash of what a job trains: the dataset bytes, the base model and the params."""
    body = {k: v for k, v in params.model_dump(mode="json").items() if k not in _FINGERPRINT_EXCLUDES}
    canonical = json.dumps(
        {"dataset": dataset_sha256, "base_model": base_model, "params": body},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
