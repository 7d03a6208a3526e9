"""The estimate of a job: VRAM breakdown, OOM risk, ranked fixes, duration and cost.

``estimate(model, params, gpu=..., pricing=..., dataset=..., device=...)`` is pure
arithmetic over the catalogs (~0.05 ms without fixes, ~0.5 ms with
them), so the server can run it on every CreateJob and EstimateJob.

OOM risk bands (SPEC.md §2, seed E03 "Proactive OOM warning"): utilisation =
total / capacity; **high** above 78/80, **moderate** from 75/80 to 78/80, **low**
below. A shortage is reported when the total exceeds the capacity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from brightrun_server.domain.estimate.catalog import (
    Device,
    GpuSpec,
    ModelArch,
    get_gpu,
    gpu_catalog,
    model_catalog,
    resolve_model,
)
from brightrun_server.domain.estimate.memory import (
    MemoryBreakdown,
    MemoryItem,
    lora_parameter_count,
    memory_breakdown,
)
from brightrun_trainer.spec import QuantizationMode, TrainingParams

Pricing = Literal["spot", "on_demand"]

#: Risk thresholds as fractions of capacity (seed E03: "> 78GB" of 80 is high,
#: "75-78GB" moderate).
HIGH_RISK_ABOVE = 78 / 80
MODERATE_RISK_FROM = 75 / 80

#: The SPEC's allowed values a fix may move to (domain/config.py RANGES).
_BATCH_SIZES = (8, 4, 2, 1)
_MAX_LENGTHS = (4096, 2048, 1024, 512)
_MAX_GRAD_ACCUMULATION = 64


class Risk(StrEnum):
    LOW = "low"
    MODERATE = "moderate"
    HIGH = "high"


def risk_band(total_bytes: int, capacity_bytes: int) -> Risk:
    """Risk of a total against a capacity, with exact integer comparisons."""
    if total_bytes * 80 > capacity_bytes * 78:
        return Risk.HIGH
    if total_bytes * 80 >= capacity_bytes * 75:
        return Risk.MODERATE
    return Risk.LOW


@dataclass(frozen=True, slots=True)
class DatasetTokenStats:
    """Token facts of a dataset: what duration and the max-length fix need.

    ``histogram`` maps an inclusive upper bound of tokens per example to the number
    of examples in that bucket (ascending bounds); :meth:`from_lengths` keeps the
    SPEC's max lengths (512 / 1024 / 2048 / 4096) as exact bucket bounds so the
    share truncated at those lengths is exact.
    """

    num_examples: int
    total_tokens: int
    max_tokens: int
    histogram: tuple[tuple[int, int], ...] = ()
    #: Tokens truncation would drop at each SPEC max length (exact when built
    #: from lengths).
    tokens_over: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_lengths(cls, lengths: Iterable[int]) -> DatasetTokenStats:
        values = sorted(int(n) for n in lengths)
        bounds = sorted({*(2**k for k in range(4, 18)), *_MAX_LENGTHS})
        hist: list[tuple[int, int]] = []
        idx = 0
        for bound in bounds:
            start = idx
            while idx < len(values) and values[idx] <= bound:
                idx += 1
            hist.append((bound, idx - start))
        if idx < len(values):
            hist.append((values[-1], len(values) - idx))
        over = tuple((m, sum(max(0, n - m) for n in values)) for m in _MAX_LENGTHS)
        return cls(
            num_examples=len(values),
            total_tokens=sum(values),
            max_tokens=values[-1] if values else 0,
            histogram=tuple((b, c) for b, c in hist if c),
            tokens_over=over,
        )

    @classmethod
    def assumed(cls, num_examples: int, mean_tokens: int) -> DatasetTokenStats:
        """Without a tokenized dataset: examples x an assumed mean length."""
        return cls(
            num_examples=num_examples,
            total_tokens=num_examples * mean_tokens,
            max_tokens=0,
        )

    def truncated_share(self, max_length: int) -> float | None:
        """Share of examples longer than ``max_length`` (None without a histogram)."""
        if not self.histogram or self.num_examples == 0:
            return None
        over = 0
        for bound, count in self.histogram:
            if bound > max_length:
                over += count
        return over / self.num_examples

    def tokens_within(self, max_length: int) -> int:
        """Tokens left after truncating every example to ``max_length``."""
        for m, dropped in self.tokens_over:
            if m == max_length:
                return self.total_tokens - dropped
        if self.max_tokens and self.max_tokens <= max_length:
            return self.total_tokens
        return min(self.total_tokens, self.num_examples * max_length)


@dataclass(frozen=True, slots=True)
class Fix:
    """A change that lowers the estimate, with its prediction."""

    kind: str
    title: str
    #: TrainingParams field -> new value, or ``base_model`` -> catalog id.
    diff: Mapping[str, Any]
    predicted_total_bytes: int
    predicted_risk: Risk
    saves_bytes: int
    #: Fits with margin: low risk after the fix.
    fits: bool
    tradeoff: str
    #: Share of examples the fix truncates (max-length fix with a dataset).
    truncated_share: float | None = None


@dataclass(frozen=True, slots=True)
class Range:
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class CostLine:
    name: str
    low_usd: float
    high_usd: float
    formula: str


@dataclass(frozen=True, slots=True)
class CostEstimate:
    pricing: Pricing
    usd_per_hour: float
    lines: tuple[CostLine, ...]

    @property
    def total(self) -> Range:
        return Range(sum(line.low_usd for line in self.lines), sum(line.high_usd for line in self.lines))


@dataclass(frozen=True, slots=True)
class DurationEstimate:
    hours: Range
    train_tokens: Range
    tokens_per_second: Range
    optimizer_steps: int
    reason: str


@dataclass(frozen=True, slots=True)
class Estimate:
    model_id: str
    gpu_id: str
    device: Device
    params: TrainingParams
    breakdown: tuple[MemoryItem, ...]
    trainable_parameters: int
    allocated_bytes: int
    total_bytes: int
    capacity_bytes: int
    risk: Risk
    shortage_bytes: int
    fixes: tuple[Fix, ...]
    duration: DurationEstimate | None
    #: Cost at the requested pricing, then both for comparison.
    cost: CostEstimate | None
    cost_spot: CostEstimate | None
    cost_on_demand: CostEstimate | None

    @property
    def utilisation(self) -> float:
        return self.total_bytes / self.capacity_bytes

    @property
    def top_fix(self) -> Fix | None:
        return self.fixes[0] if self.fixes else None


def estimate(
    model: ModelArch | str,
    params: TrainingParams,
    *,
    gpu: str | GpuSpec | None = None,
    pricing: Pricing = "spot",
    dataset: DatasetTokenStats | None = None,
    device: Device | None = None,
    padded: bool | None = None,
    with_fixes: bool = True,
) -> Estimate:
    """Estimate one configuration on one GPU type.

    ``model``: a catalog id / alias, a local model folder, or a ModelArch.
    ``gpu``: a catalog id / alias (default H100-80GB) or a GpuSpec; ``device``
    defaults to the GPU's ("cpu" for the ``cpu`` entry). ``dataset``: token facts
    for duration, cost and the max-length fix; without it duration and cost are None.
    Raises catalog.UnknownModel / UnknownGpu for unknown names.
    """
    arch = resolve_model(model)
    spec = gpu if isinstance(gpu, GpuSpec) else get_gpu(gpu)
    dev: Device = device or spec.device
    longest = dataset.max_tokens if dataset and dataset.max_tokens else None
    bd = _breakdown(arch, params, dev, longest, padded)
    total = bd.total_bytes
    risk = risk_band(total, spec.memory_bytes)
    fixes: tuple[Fix, ...] = ()
    if with_fixes and risk != Risk.LOW:
        fixes = rank_fixes(arch, params, spec, dev, dataset, padded, total)
    duration = estimate_duration(arch, params, spec, dataset) if dataset else None
    costs = {p: estimate_cost(arch, params, spec, duration, p) if duration else None for p in ("spot", "on_demand")}
    return Estimate(
        model_id=arch.id,
        gpu_id=spec.id,
        device=dev,
        params=params,
        breakdown=bd.items,
        trainable_parameters=bd.trainable_parameters,
        allocated_bytes=bd.allocated_bytes,
        total_bytes=total,
        capacity_bytes=spec.memory_bytes,
        risk=risk,
        shortage_bytes=max(0, total - spec.memory_bytes),
        fixes=fixes,
        duration=duration,
        cost=costs[pricing],
        cost_spot=costs["spot"],
        cost_on_demand=costs["on_demand"],
    )


def _breakdown(
    arch: ModelArch,
    params: TrainingParams,
    device: Device,
    longest: int | None,
    padded: bool | None,
) -> MemoryBreakdown:
    return memory_breakdown(
        arch,
        params,
        device=device,
        defaults=gpu_catalog().defaults,
        longest_example=longest,
        padded=padded,
    )


# --------------------------------------------------------------------------- fixes

#: Quality/cost impact order used after "fits with margin" (lower is better):
#: 1 smaller micro batch + gradient accumulation: same effective batch, same
#:   maths up to summation order; steps run less parallel (~10-20 % slower).
#: 2 a shorter max length that truncates no example (dataset known): no change.
#: 3 gradient checkpointing: no quality change; ~33 % more compute (one extra
#:   forward, Chen et al. 2016).
#: 4 NF4 quantization: QLoRA matches 16-bit LoRA on the paper's benchmarks
#:   (Dettmers et al. 2023, sec. 5) but is slower and not bit-identical.
#: 5 Conservative preset: lower rank and learning rate, fewer epochs — less
#:   adapter capacity (seed E03: "may reduce quality by ~5-10 %").
#: 6 a shorter max length that truncates examples: loses context.
#: 7 a smaller base model: the largest quality change.
_IMPACT = {
    "reduce_batch_size": 1,
    "shorter_max_length_lossless": 2,
    "gradient_checkpointing": 3,
    "quantize_4bit": 4,
    "conservative_preset": 5,
    "shorter_max_length": 6,
    "smaller_model": 7,
}


def rank_fixes(
    arch: ModelArch,
    params: TrainingParams,
    spec: GpuSpec,
    device: Device,
    dataset: DatasetTokenStats | None,
    padded: bool | None,
    current_total: int,
) -> tuple[Fix, ...]:
    """Single-change fixes that lower the estimate, ranked: fits with margin (low
    risk) first, then by ``_IMPACT``, then by the lower predicted total."""
    longest = dataset.max_tokens if dataset and dataset.max_tokens else None
    candidates: list[tuple[str, str, dict[str, Any], str, ModelArch, float | None]] = []

    def add(
        kind: str,
        title: str,
        diff: dict[str, Any],
        tradeoff: str,
        target: ModelArch = arch,
        share: float | None = None,
    ) -> None:
        candidates.append((kind, title, diff, tradeoff, target, share))

    # 1. Smaller micro batch, effective batch kept through gradient accumulation:
    # the largest allowed batch that fits, else the smallest.
    smaller = [b for b in _BATCH_SIZES if b < params.batch_size]
    choice = _first_fitting(
        smaller,
        lambda b: _with(params, batch_size=b),
        arch,
        spec,
        device,
        longest,
        padded,
    )
    if choice is not None:
        accum = min(
            _MAX_GRAD_ACCUMULATION,
            params.gradient_accumulation_steps * params.batch_size // choice,
        )
        add(
            "reduce_batch_size",
            f"Reduce batch_size from {params.batch_size} to {choice}",
            {"batch_size": choice, "gradient_accumulation_steps": accum},
            f"effective batch kept at {choice * accum} with gradient accumulation x{accum}; "
            "each step runs less parallel work (slower)",
        )
    # 2. Shorter max length.
    shorter = [m for m in _MAX_LENGTHS if m < params.max_seq_length]
    length = _first_fitting(
        shorter,
        lambda m: _with(params, max_seq_length=m),
        arch,
        spec,
        device,
        longest,
        padded,
    )
    if length is not None:
        share = dataset.truncated_share(length) if dataset else None
        lossless = share == 0.0
        detail = (
            "no example is longer; nothing is truncated"
            if lossless
            else (
                f"truncates {share:.1%} of examples (longer than {length} tokens)"
                if share is not None
                else f"truncates every example longer than {length} tokens (share unknown without the dataset)"
            )
        )
        add(
            "shorter_max_length_lossless" if lossless else "shorter_max_length",
            f"Reduce max_seq_length from {params.max_seq_length} to {length}",
            {"max_seq_length": length},
            detail,
            share=share,
        )
    # 3. Gradient checkpointing.
    if not params.gradient_checkpointing:
        add(
            "gradient_checkpointing",
            "Enable gradient checkpointing",
            {"gradient_checkpointing": True},
            "recomputes each layer in the backward pass: ~33 % more compute, same result",
        )
    # 4. 4-bit quantization (QLoRA).
    if params.quantization != QuantizationMode.NF4:
        add(
            "quantize_4bit",
            "Load the base model in 4-bit NF4 (QLoRA)",
            {"quantization": QuantizationMode.NF4.value},
            "base weights at ~4.1 bits; QLoRA matches 16-bit LoRA on the paper's benchmarks but steps are slower",
        )
    # 5. Conservative preset.
    conservative = _conservative_diff(params)
    if conservative:
        add(
            "conservative_preset",
            f"Switch to the Conservative preset (rank {conservative.get('lora_rank', 8)})",
            conservative,
            "smaller adapter and learning rate, fewer epochs: less capacity to learn "
            "(seed estimate: quality ~5-10 % lower), cheaper",
        )
    # 6. A smaller base model.
    smaller_model = _smaller_model(arch, params, spec, device, longest, padded)
    if smaller_model is not None:
        add(
            "smaller_model",
            f"Use a smaller base model: {smaller_model.id}",
            {"base_model": smaller_model.id},
            f"{smaller_model.parameter_count() / 1e9:.1f}B instead of "
            f"{arch.parameter_count() / 1e9:.1f}B parameters: a different, weaker model",
            target=smaller_model,
        )

    fixes: list[Fix] = []
    for kind, title, diff, tradeoff, target, share in candidates:
        new_params = _with(params, **{k: v for k, v in diff.items() if k != "base_model"})
        total = _breakdown(target, new_params, device, longest, padded).total_bytes
        if total >= current_total:
            continue
        risk = risk_band(total, spec.memory_bytes)
        fixes.append(
            Fix(
                kind=kind,
                title=title,
                diff=diff,
                predicted_total_bytes=total,
                predicted_risk=risk,
                saves_bytes=current_total - total,
                fits=risk == Risk.LOW,
                tradeoff=tradeoff,
                truncated_share=share,
            )
        )
    fixes.sort(key=lambda f: (not f.fits, _IMPACT[f.kind], f.predicted_total_bytes))
    return tuple(fixes)


def _with(params: TrainingParams, **changes: Any) -> TrainingParams:
    if "quantization" in changes:
        changes["quantization"] = QuantizationMode(changes["quantization"])
    return params.model_copy(update=changes)


def _first_fitting(
    options: Sequence[int],
    make: Any,
    arch: ModelArch,
    spec: GpuSpec,
    device: Device,
    longest: int | None,
    padded: bool | None,
) -> int | None:
    """The first option (largest first) that brings the risk to low, else the last."""
    if not options:
        return None
    for option in options:
        total = _breakdown(arch, make(option), device, longest, padded).total_bytes
        if risk_band(total, spec.memory_bytes) == Risk.LOW:
            return option
    return options[-1]


def _conservative_diff(params: TrainingParams) -> dict[str, Any]:
    from brightrun_server.domain.config import PRESETS, PresetName

    preset = PRESETS[PresetName.CONSERVATIVE]
    fields = ("lora_rank", "lora_alpha", "learning_rate", "epochs")
    diff = {f: getattr(preset, f) for f in fields if getattr(params, f) != getattr(preset, f)}
    if "lora_rank" not in diff or params.lora_rank <= preset.lora_rank:
        return {}
    return diff


def _smaller_model(
    arch: ModelArch,
    params: TrainingParams,
    spec: GpuSpec,
    device: Device,
    longest: int | None,
    padded: bool | None,
) -> ModelArch | None:
    """The largest catalog model with fewer parameters that fits with margin,
    preferring the same family."""
    size = arch.parameter_count()
    fitting: list[tuple[bool, int, ModelArch]] = []
    for m in model_catalog().models:
        n = m.parameter_count()
        if n >= size:
            continue
        total = _breakdown(m, params, device, longest, padded).total_bytes
        if risk_band(total, spec.memory_bytes) == Risk.LOW:
            fitting.append((m.family == arch.family, n, m))
    if not fitting:
        return None
    fitting.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return fitting[0][2]


# ------------------------------------------------------------------- duration, cost


#: FLOPs per token of a LoRA training step. Forward: 2 x active parameters (one
#: multiply-add per weight; Kaplan et al. 2020, sec. 2.1) plus attention scores
#: 2 x L x q x s (QK^T and AV, causal half: 4 x L x q x s / 2). Backward: the
#: gradient with respect to the activations costs another 2N (frozen base weights
#: get no weight gradient, so LoRA's backward is ~1x forward, not the 2x of full
#: fine-tuning); attention backward ~2x its forward. Gradient checkpointing adds one
#: forward. Evaluation tokens cost one forward.
def _flops_per_train_token(arch: ModelArch, params: TrainingParams, seq: int) -> float:
    n = arch.active_parameter_count() + lora_parameter_count(arch, params)
    attn_fwd = 2 * arch.num_layers * arch.q_dim * seq
    fwd = 2 * n + attn_fwd
    bwd = 2 * n + 2 * attn_fwd
    return fwd + bwd + (fwd if params.gradient_checkpointing else 0)


def _flops_per_eval_token(arch: ModelArch, seq: int) -> float:
    return 2 * arch.active_parameter_count() + 2 * arch.num_layers * arch.q_dim * seq


def _method(params: TrainingParams) -> str:
    return {
        QuantizationMode.NONE: "lora",
        QuantizationMode.NF4: "qlora",
        QuantizationMode.INT8: "int8",
    }[params.quantization]


#: Padding: batches are padded to their longest example. With a micro batch of 1
#: nothing is padded; with random batching of chat data of mixed lengths, padding
#: adds up to ~30 % (an assumption for the high end of the range).
_PADDING_HIGH = 0.30


def estimate_duration(
    arch: ModelArch, params: TrainingParams, spec: GpuSpec, dataset: DatasetTokenStats
) -> DurationEstimate:
    """Duration range: tokens x FLOPs per token / (peak FLOPs x MFU) + startup."""
    defaults = gpu_catalog().defaults
    train_share = 1.0 - params.validation_split
    tokens = dataset.tokens_within(params.max_seq_length)
    train_examples = max(1, round(dataset.num_examples * train_share))
    steps_per_epoch = max(1, math.ceil(train_examples / (params.batch_size * params.gradient_accumulation_steps)))
    steps = steps_per_epoch * params.epochs
    if params.max_steps:
        steps = min(steps, params.max_steps)
    epochs_run = steps / steps_per_epoch
    train_tokens = tokens * train_share * epochs_run
    padding = _PADDING_HIGH * (1 - 1 / params.batch_size)
    train_range = Range(train_tokens, train_tokens * (1 + padding))
    # Evaluations: at each epoch end and each checkpoint unless an interval is set.
    interval = params.eval_interval_steps or params.checkpoint_interval_steps
    evals = math.ceil(epochs_run) + steps // max(1, interval)
    eval_tokens = tokens * params.validation_split * evals
    mean_seq = max(1, min(params.max_seq_length, tokens // max(1, dataset.num_examples)))
    flops_train = _flops_per_train_token(arch, params, mean_seq)
    flops_eval = _flops_per_eval_token(arch, mean_seq)
    mfu_low, mfu_high = defaults.mfu[_method(params)]
    peak = spec.bf16_dense_tflops * 1e12
    start_low, start_high = defaults.startup_minutes

    def hours(train_tok: float, mfu: float, startup_min: float) -> float:
        seconds = (train_tok * flops_train + eval_tokens * flops_eval) / (peak * mfu)
        return seconds / 3600 + startup_min / 60

    low = hours(train_range.low, mfu_high, start_low)
    high = hours(train_range.high, mfu_low, start_high)
    tps = Range(peak * mfu_low / flops_train, peak * mfu_high / flops_train)
    reason = (
        f"{train_range.low:,.0f}-{train_range.high:,.0f} training tokens "
        f"({dataset.num_examples:,} examples x {train_share:.0%} train split x "
        f"{epochs_run:g} epochs; the high end adds up to {padding:.0%} padding) at "
        f"{flops_train / 1e9:.1f} GFLOP/token on {spec.bf16_dense_tflops:g} TFLOPS at "
        f"{mfu_low:.0%}-{mfu_high:.0%} utilisation (kernel efficiency varies with "
        f"sequence length, batch and {_method(params)}), plus {evals} evaluation passes and "
        f"{start_low:g}-{start_high:g} min provisioning and model loading"
    )
    return DurationEstimate(
        hours=Range(low, high),
        train_tokens=train_range,
        tokens_per_second=tps,
        optimizer_steps=steps,
        reason=reason,
    )


def estimate_cost(
    arch: ModelArch,
    params: TrainingParams,
    spec: GpuSpec,
    duration: DurationEstimate,
    pricing: Pricing,
) -> CostEstimate:
    """Cost lines as in the seed's panel: base training + storage + buffer.

    * base training: duration x hourly rate;
    * storage: checkpoints and the adapter kept for a month: each checkpoint holds
      the fp32 adapter plus AdamW's two moments (12 B per trainable parameter);
    * buffer: a share of base training for spot interruptions (re-provisioning,
      recomputing steps since the last checkpoint) or on-demand retries.
    """
    defaults = gpu_catalog().defaults
    rate = spec.spot_usd_per_hour if pricing == "spot" else spec.on_demand_usd_per_hour
    base = CostLine(
        "base training",
        duration.hours.low * rate,
        duration.hours.high * rate,
        f"{duration.hours.low:.2f}-{duration.hours.high:.2f} h x ${rate:.2f}/h ({pricing})",
    )
    n = lora_parameter_count(arch, params)
    checkpoints = 1 + duration.optimizer_steps // max(1, params.checkpoint_interval_steps)
    gb = (checkpoints * 12 * n + 4 * n) / 1e9
    storage_usd = gb * defaults.storage_usd_per_gb_month
    storage = CostLine(
        "storage",
        storage_usd,
        storage_usd,
        f"{checkpoints} checkpoints x 12 B x {n:,} params + adapter = {gb:.2f} GB x "
        f"${defaults.storage_usd_per_gb_month:.2f}/GB-month",
    )
    share = defaults.buffer_fraction[pricing]
    buffer = CostLine(
        "buffer",
        base.low_usd * share,
        base.high_usd * share,
        f"{share:.0%} of base training for " + ("spot interruptions and recovery" if pricing == "spot" else "retries"),
    )
    return CostEstimate(pricing=pricing, usd_per_hour=rate, lines=(base, storage, buffer))
