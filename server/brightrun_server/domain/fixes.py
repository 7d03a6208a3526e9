"""Suggested fixes for a failed job: which changes, in what order, with what
expected effect and how often they worked before.

Candidates depend on the failure class. Out of memory follows SPEC §6's order —
reduce the batch size (keeping the effective batch with gradient accumulation),
the Conservative preset, a shorter max length, then gradient checkpointing,
4-bit quantization and a smaller model — each re-estimated when the estimator
knows the model, and fixes that bring the estimate under capacity move first.
Divergence lowers the learning rate, clips gradients and warms up longer.
System failures retry as they are or on on-demand capacity.

Confidence is the completion rate of recorded retries that applied the fix
after the same class of failure; with fewer than EXPERIMENTAL_BELOW outcomes
the fix is marked experimental. Two fixes are incompatible when they set the
same field, or both replace the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from brightrun_server.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument
from brightrun_server.domain.failures import FailureClass

EXPERIMENTAL_BELOW = 20
ALLOWED_MAX_LENGTHS = (512, 1024, 2048, 4096)


@dataclass(frozen=True, slots=True)
class Effect:
    memory_bytes: int | None = None
    memory_bytes_before: int | None = None
    duration_hours: tuple[float, float] | None = None
    cost_usd: tuple[float, float] | None = None
    fits: bool | None = None


@dataclass(frozen=True, slots=True)
class Fix:
    id: str
    title: str
    description: str
    config_changes: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""
    compute_changes: dict[str, Any] = field(default_factory=dict)
    #: Can RetryJob apply it (a dataset fix needs a new upload instead).
    applicable: bool = True
    effect: Effect = Effect()
    summary: str = ""
    success_rate: float = 0.0
    outcomes: int = 0
    incompatible_with: tuple[str, ...] = ()

    @property
    def experimental(self) -> bool:
        return self.outcomes < EXPERIMENTAL_BELOW

    def fields(self) -> set[str]:
        touched = set(self.config_changes) | {f"compute.{k}" for k in self.compute_changes}
        if self.base_model:
            touched.add("base_model")
        return touched


#: Estimates a configuration: (params dict, base model, compute) -> Effect, or None.
Estimator = Callable[[Mapping[str, Any], str, Mapping[str, Any]], Effect | None]


def suggest(
    failure_class: FailureClass,
    params: Mapping[str, Any],
    *,
    base_model: str,
    compute: Mapping[str, Any],
    estimator: Estimator | None = None,
    outcomes: Mapping[str, tuple[int, int]] | None = None,
    dataset_errors: Sequence[str] = (),
    smaller_model: str = "",
) -> list[Fix]:
    """Ranked fixes for a failure. `outcomes` maps fix id -> (completed, total)."""
    candidates = _candidates(failure_class, params, compute, dataset_errors, smaller_model)
    before = estimator(params, base_model, compute) if estimator else None
    scored: list[tuple[tuple[int, float, int], Fix]] = []
    for priority, fix in enumerate(candidates):
        effect = Effect()
        if estimator and fix.applicable:
            merged = {**params, **fix.config_changes}
            after = estimator(merged, fix.base_model or base_model, {**compute, **fix.compute_changes})
            if after is not None:
                effect = Effect(
                    memory_bytes=after.memory_bytes,
                    memory_bytes_before=before.memory_bytes if before else None,
                    duration_hours=after.duration_hours,
                    cost_usd=after.cost_usd,
                    fits=after.fits,
                )
        done, total = (outcomes or {}).get(fix.id, (0, 0))
        rate = done / total if total else 0.0
        fix = _replace(fix, effect=effect, success_rate=rate, outcomes=total, summary=_summary(fix, effect))
        # Fixes that bring the estimate under capacity first, then proven ones, then SPEC order.
        fits_rank = 0 if effect.fits else (1 if effect.fits is None else 2)
        proven = -rate if total >= EXPERIMENTAL_BELOW else 0.0
        scored.append(((fits_rank if failure_class is FailureClass.OUT_OF_MEMORY else 0, proven, priority), fix))
    ranked = [fix for _, fix in sorted(scored, key=lambda item: item[0])]
    return [
        _replace(f, incompatible_with=tuple(o.id for o in ranked if o.id != f.id and f.fields() & o.fields()))
        for f in ranked
    ]


def combine(fixes: Sequence[Fix], chosen: Sequence[str]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Merge the chosen fixes' changes; refuse unknown, inapplicable or
    incompatible combinations naming the fix ids."""
    by_id = {f.id: f for f in fixes}
    violations = [
        FieldViolation("fix_ids", f"unknown fix {fix_id!r}; suggested: {', '.join(by_id) or 'none'}")
        for fix_id in chosen
        if fix_id not in by_id
    ]
    if violations:
        raise InvalidArgument(violations)
    picked = [by_id[i] for i in dict.fromkeys(chosen)]
    for fix in picked:
        if not fix.applicable:
            raise FailedPrecondition(
                f"fix {fix.id!r} cannot be applied by a retry: {fix.description}",
                reason="FIX_NOT_APPLICABLE",
                metadata={"fix_id": fix.id},
            )
    for i, a in enumerate(picked):
        for b in picked[i + 1 :]:
            if b.id in a.incompatible_with:
                shared = ", ".join(sorted(a.fields() & b.fields()))
                raise InvalidArgument(
                    [FieldViolation("fix_ids", f"fixes {a.id!r} and {b.id!r} both change {shared}; choose one")],
                    reason="FIXES_INCOMPATIBLE",
                    metadata={"fix_ids": f"{a.id},{b.id}"},
                )
    config: dict[str, Any] = {}
    compute: dict[str, Any] = {}
    model = ""
    for fix in picked:
        config.update(fix.config_changes)
        compute.update(fix.compute_changes)
        model = fix.base_model or model
    return config, model, compute


def _replace(fix: Fix, **changes: Any) -> Fix:
    values = {name: getattr(fix, name) for name in Fix.__dataclass_fields__}
    values.update(changes)
    return Fix(**values)


def _summary(fix: Fix, effect: Effect) -> str:
    if effect.memory_bytes is not None and effect.memory_bytes_before:
        change = 1 - effect.memory_bytes / effect.memory_bytes_before
        direction = "less" if change >= 0 else "more"
        return f"peak memory {effect.memory_bytes / 2**30:.1f} GiB ({abs(change):.0%} {direction})"
    return fix.title


def _candidates(
    failure_class: FailureClass,
    params: Mapping[str, Any],
    compute: Mapping[str, Any],
    dataset_errors: Sequence[str],
    smaller_model: str,
) -> list[Fix]:
    fixes: list[Fix] = []
    if failure_class is FailureClass.OUT_OF_MEMORY:
        batch, accum = int(params["batch_size"]), int(params["gradient_accumulation_steps"])
        if batch > 1:
            new_batch = batch // 2
            fixes.append(
                Fix(
                    "reduce_batch_size",
                    f"Reduce batch size to {new_batch}",
                    f"Halve the micro-batch ({batch} → {new_batch}) and double gradient accumulation "
                    f"({accum} → {min(64, accum * 2)}) so the effective batch stays {batch * accum}.",
                    {"batch_size": new_batch, "gradient_accumulation_steps": min(64, accum * 2)},
                )
            )
        if int(params["lora_rank"]) > 8:
            fixes.append(
                Fix(
                    "conservative_preset",
                    "Use the Conservative preset",
                    "Rank 8, alpha 16, learning rate 1e-4, 2 epochs: fewer trainable parameters and optimizer state.",
                    {"lora_rank": 8, "lora_alpha": 16, "learning_rate": 1e-4, "epochs": 2},
                )
            )
        shorter = [m for m in ALLOWED_MAX_LENGTHS if m < int(params["max_seq_length"])]
        if shorter:
            fixes.append(
                Fix(
                    "shorter_max_length",
                    f"Shorten max length to {shorter[-1]}",
                    f"Activations grow with sequence length; examples longer than {shorter[-1]} tokens are truncated.",
                    {"max_seq_length": shorter[-1]},
                )
            )
        if not params.get("gradient_checkpointing"):
            fixes.append(
                Fix(
                    "gradient_checkpointing",
                    "Enable gradient checkpointing",
                    "Recompute activations in the backward pass: far less activation memory, about 30% slower.",
                    {"gradient_checkpointing": True},
                )
            )
        if params.get("quantization") != "nf4":
            fixes.append(
                Fix(
                    "quantize_4bit",
                    "Load the base model in 4-bit (QLoRA)",
                    "NF4 base weights take a quarter of 16-bit memory; quality is usually within noise for LoRA.",
                    {"quantization": "nf4"},
                )
            )
        if smaller_model:
            fixes.append(
                Fix(
                    "smaller_model",
                    f"Switch to {smaller_model}",
                    "A smaller base model of the same family needs less memory for weights and activations.",
                    base_model=smaller_model,
                )
            )
    elif failure_class is FailureClass.LOSS_DIVERGENCE:
        lr = float(params["learning_rate"])
        fixes.append(
            Fix(
                "lower_learning_rate",
                f"Lower the learning rate to {lr / 4:.2g}",
                "Divergence usually means steps too large for the loss surface.",
                {"learning_rate": lr / 4},
            )
        )
        if not 0 < float(params["max_grad_norm"]) <= 1.0:
            fixes.append(
                Fix(
                    "clip_gradients",
                    "Clip gradients at norm 1.0",
                    "Bounds the size of any single update.",
                    {"max_grad_norm": 1.0},
                )
            )
        if float(params["warmup_ratio"]) < 0.1:
            fixes.append(
                Fix(
                    "longer_warmup",
                    "Warm up over 10% of the steps",
                    "A gentler start avoids early blow-ups with adapters initialised at zero.",
                    {"warmup_ratio": 0.1},
                )
            )
    elif failure_class is FailureClass.DATASET_FORMAT:
        first = "; ".join(dataset_errors[:3]) or "see the dataset's validation errors"
        fixes.append(
            Fix(
                "fix_dataset",
                "Fix the dataset and upload it again",
                f"The trainer found errors a retry cannot fix: {first}. "
                "Run `brightrun datasets validate FILE` to list every error with its place and fix.",
                applicable=False,
            )
        )
    elif failure_class is FailureClass.MODEL_UNAVAILABLE:
        fixes.append(
            Fix(
                "check_model",
                "Check the base model name or path",
                "The model could not be found or loaded: check the hub name, gated-model access, or the local path.",
                applicable=False,
            )
        )
    elif failure_class is FailureClass.DISK_FULL:
        interval = int(params["checkpoint_interval_steps"])
        fixes.append(
            Fix(
                "fewer_checkpoints",
                f"Checkpoint every {interval * 2} steps",
                "Free disk space on the worker, and write half as many checkpoints.",
                {"checkpoint_interval_steps": min(100_000, interval * 2)},
            )
        )
    elif failure_class is FailureClass.TRAINING_TIMEOUT:
        hours = float(compute.get("max_duration_seconds", 86_400)) / 3600
        fixes.append(
            Fix(
                "longer_max_duration",
                f"Allow {min(168.0, hours * 2):g} hours",
                "The job hit its maximum duration; resume from its checkpoint with more time.",
                compute_changes={"max_duration_seconds": min(7 * 86_400, hours * 2 * 3600)},
            )
        )
    if failure_class not in (FailureClass.DATASET_FORMAT, FailureClass.MODEL_UNAVAILABLE):
        fixes.append(
            Fix(
                "retry_same_config",
                "Retry with the same configuration",
                "Worth it when the failure came from the platform, not the configuration.",
            )
        )
    if compute.get("pricing_tier") == "spot" and failure_class in (
        FailureClass.SPOT_INTERRUPTION,
        FailureClass.PROVISIONING,
        FailureClass.WORKER_LOST,
    ):
        fixes.append(
            Fix(
                "switch_to_on_demand",
                "Run on on-demand capacity",
                "On-demand capacity is not reclaimed; it costs more per hour.",
                compute_changes={"pricing_tier": "on_demand"},
            )
        )
    return fixes
