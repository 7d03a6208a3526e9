"""Estimates for jobs: the estimator applied to a stored dataset, as plain data.

The estimator (domain/estimate) is pure; this module feeds it what the server
knows about a dataset and turns the result into the JSON document stored on the
job and sent over the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from brightrun_server.domain.errors import FieldViolation, InvalidArgument
from brightrun_server.domain.estimate import (
    CostEstimate,
    DatasetTokenStats,
    Estimate,
    GpuSpec,
    Risk,
    UnknownModel,
    estimate,
    model_catalog,
)
from brightrun_server.domain.pricing import PricingTier
from brightrun_server.store.models import DatasetRow
from brightrun_trainer.spec import TrainingParams

#: Chat templates add a few tokens per message (role markers, separators).
TEMPLATE_TOKENS_PER_MESSAGE = 4
#: Characters per token for English text with BPE vocabularies of 32k-150k.
CHARS_PER_TOKEN = 4.0
APPROXIMATE = (
    f"approximate: characters / {CHARS_PER_TOKEN:g} + {TEMPLATE_TOKENS_PER_MESSAGE} template tokens per message"
)


def token_stats(dataset: DatasetRow) -> tuple[DatasetTokenStats, str]:
    """Token facts of a stored dataset and where they came from: the real
    counts of a tokenizer-aware validation when one ran, else an approximation."""
    stats = dataset.stats
    examples = int(stats.get("training_pairs", 0))
    if stats.get("token_histogram") and stats.get("total_tokens"):
        buckets = tuple(
            (int(b["high"] if b.get("high") is not None else stats["max_tokens"]), int(b["count"]))
            for b in stats["token_histogram"]
            if b["count"]
        )
        real = DatasetTokenStats(
            num_examples=examples,
            total_tokens=int(stats["total_tokens"]),
            max_tokens=int(stats.get("max_tokens", 0)),
            histogram=buckets,
        )
        return real, f"tokenizer of {stats.get('tokenizer') or 'the base model'}"
    chars = int(stats.get("content_chars", 0))
    messages = int(stats.get("messages", 0))
    if examples <= 0:
        return DatasetTokenStats.assumed(0, 0), APPROXIMATE
    total = chars / CHARS_PER_TOKEN + messages * TEMPLATE_TOKENS_PER_MESSAGE
    return DatasetTokenStats.assumed(examples, max(1, round(total / examples))), APPROXIMATE


def run(
    base_model: str,
    params: TrainingParams,
    gpu: GpuSpec,
    tier: PricingTier,
    dataset: DatasetRow | None,
) -> dict[str, Any]:
    """Estimate a configuration; raise InvalidArgument naming base_model if the
    model's architecture is unknown."""
    stats, source = token_stats(dataset) if dataset is not None else (None, "")
    try:
        result = estimate(base_model, params, gpu=gpu, pricing=tier.value, dataset=stats)
    except UnknownModel:
        known = ", ".join(sorted(m.id for m in model_catalog().models)[:12])
        raise InvalidArgument(
            [
                FieldViolation(
                    "base_model",
                    f"{base_model!r} is neither in the model catalog nor a local directory with a config.json; "
                    f"catalog models include {known}, ...",
                )
            ],
            reason="MODEL_UNKNOWN",
            metadata={"base_model": base_model},
        ) from None
    return to_document(result, source)


def to_document(est: Estimate, token_source: str) -> dict[str, Any]:
    return {
        "model": est.model_id,
        "gpu_type": est.gpu_id,
        "device": est.device,
        "memory": [
            {"name": m.name, "bytes": m.bytes, "formula": m.formula, "kind": m.kind}
            for m in sorted(est.breakdown, key=lambda m: -m.bytes)
        ],
        "trainable_parameters": est.trainable_parameters,
        "total_bytes": est.total_bytes,
        "capacity_bytes": est.capacity_bytes,
        "utilization": est.total_bytes / est.capacity_bytes if est.capacity_bytes else 0.0,
        "oom_risk": est.risk.value,
        "shortage_bytes": est.shortage_bytes,
        "fixes": [
            {
                "kind": f.kind,
                "title": f.title,
                "config_changes": {k: _plain(v) for k, v in f.diff.items() if k != "base_model"},
                "base_model": str(f.diff.get("base_model", "")),
                "predicted_total_bytes": f.predicted_total_bytes,
                "predicted_risk": f.predicted_risk.value,
                "saves_bytes": f.saves_bytes,
                "fits": f.fits,
                "tradeoff": f.tradeoff,
                "truncated_share": f.truncated_share,
            }
            for f in est.fixes
        ],
        "duration": None
        if est.duration is None
        else {
            "hours": [est.duration.hours.low, est.duration.hours.high],
            "train_tokens": [est.duration.train_tokens.low, est.duration.train_tokens.high],
            "tokens_per_second": [est.duration.tokens_per_second.low, est.duration.tokens_per_second.high],
            "optimizer_steps": est.duration.optimizer_steps,
            "reason": est.duration.reason,
        },
        "cost_spot": _cost(est.cost_spot),
        "cost_on_demand": _cost(est.cost_on_demand),
        "token_source": token_source,
    }


def _cost(cost: CostEstimate | None) -> dict[str, Any] | None:
    if cost is None:
        return None
    return {
        "pricing_tier": cost.pricing,
        "usd_per_hour": cost.usd_per_hour,
        "lines": [
            {"name": line.name, "usd": [line.low_usd, line.high_usd], "formula": line.formula} for line in cost.lines
        ],
        "total_usd": [cost.total.low, cost.total.high],
    }


def _plain(value: Any) -> Any:
    return value.value if hasattr(value, "value") else value


def is_high_risk(document: Mapping[str, Any]) -> bool:
    return document.get("oom_risk") == Risk.HIGH.value


def describe_risk(document: Mapping[str, Any]) -> str:
    gib = 1024**3
    text = (
        f"estimated peak memory {document['total_bytes'] / gib:.1f} GiB exceeds 78/80 of the "
        f"{document['gpu_type']}'s {document['capacity_bytes'] / gib:.0f} GiB"
    )
    fixes = document.get("fixes") or []
    if fixes:
        top = fixes[0]
        text += f"; top fix: {top['title']} (→ {top['predicted_total_bytes'] / gib:.1f} GiB)"
    return text
