"""The estimate API: risk bands, ranked fixes, duration and cost."""

from __future__ import annotations

import time

import pytest

from brightrun_server.domain.config import PRESETS, PresetName, resolve
from brightrun_server.domain.estimate import (
    DatasetTokenStats,
    Estimate,
    Risk,
    estimate,
    risk_band,
)
from brightrun_trainer.spec import QuantizationMode, TrainingParams

CAP = 80 * 10**9


@pytest.mark.parametrize(
    ("total", "risk"),
    [
        (0, Risk.LOW),
        (CAP * 75 // 80 - 1, Risk.LOW),
        (CAP * 75 // 80, Risk.MODERATE),
        (CAP * 78 // 80, Risk.MODERATE),
        (CAP * 78 // 80 + 1, Risk.HIGH),
        (CAP, Risk.HIGH),
        (2 * CAP, Risk.HIGH),
    ],
)
def test_risk_bands_at_the_boundaries(total: int, risk: Risk) -> None:
    assert risk_band(total, CAP) == risk


def _dataset(n: int = 2000, spread: int = 3000) -> DatasetTokenStats:
    return DatasetTokenStats.from_lengths([300 + (i * 37) % spread for i in range(n)])


def _high_risk() -> tuple[TrainingParams, Estimate]:
    params = resolve(None, {"batch_size": 8, "max_seq_length": 4096}).params
    return params, estimate("llama-3-8b", params, dataset=_dataset())


def test_fitting_config_is_low_risk_without_fixes() -> None:
    params = resolve(None, {"batch_size": 1, "max_seq_length": 1024}).params
    est = estimate("llama-3-8b", params)
    assert est.risk == Risk.LOW
    assert est.fixes == ()
    assert est.shortage_bytes == 0
    assert est.gpu_id == "H100-80GB"
    assert est.utilisation == est.total_bytes / est.capacity_bytes


def test_oversized_config_reports_shortage_and_ranked_fixes() -> None:
    _params, est = _high_risk()
    assert est.risk == Risk.HIGH
    assert est.shortage_bytes == est.total_bytes - est.capacity_bytes > 0
    assert est.fixes
    fields = set(TrainingParams.model_fields) | {"base_model"}
    for fix in est.fixes:
        assert fix.predicted_total_bytes < est.total_bytes
        assert fix.saves_bytes == est.total_bytes - fix.predicted_total_bytes
        assert set(fix.diff) <= fields
        assert fix.fits == (fix.predicted_risk == Risk.LOW)
    # fitting fixes first
    fits = [f.fits for f in est.fixes]
    assert fits == sorted(fits, reverse=True)
    assert est.top_fix is est.fixes[0]
    assert est.top_fix.fits


def test_batch_fix_keeps_the_effective_batch() -> None:
    params, est = _high_risk()
    fix = next(f for f in est.fixes if f.kind == "reduce_batch_size")
    new_batch = fix.diff["batch_size"]
    assert new_batch < params.batch_size
    assert new_batch * fix.diff["gradient_accumulation_steps"] == params.batch_size
    applied = estimate("llama-3-8b", params.model_copy(update=dict(fix.diff)), dataset=_dataset())
    assert applied.total_bytes == fix.predicted_total_bytes


def test_max_length_fix_reports_the_truncated_share() -> None:
    _params, est = _high_risk()
    fix = next(f for f in est.fixes if f.kind.startswith("shorter_max_length"))
    length = fix.diff["max_seq_length"]
    lengths = [300 + (i * 37) % 3000 for i in range(2000)]
    expected = sum(n > length for n in lengths) / len(lengths)
    assert fix.truncated_share == pytest.approx(expected)


def test_dataset_longest_example_sets_the_peak_sequence() -> None:
    # Every example is under 1024 tokens: cutting 4096 -> 1024 truncates nothing.
    ds = DatasetTokenStats.from_lengths([200 + i % 800 for i in range(1000)])
    params = resolve(None, {"batch_size": 8, "max_seq_length": 4096}).params
    est = estimate("llama-3-8b", params, dataset=ds)
    # with the dataset, the peak batch is 999 tokens long, not 4096
    assert est.breakdown[4].name == "activations (batch=8, seq=999)"


def test_fixes_rank_by_impact_among_fitting_ones() -> None:
    _params, est = _high_risk()
    kinds = [f.kind for f in est.fixes if f.fits]
    order = [
        "reduce_batch_size",
        "shorter_max_length_lossless",
        "gradient_checkpointing",
        "quantize_4bit",
        "conservative_preset",
        "shorter_max_length",
        "smaller_model",
    ]
    assert kinds == sorted(kinds, key=order.index)


def test_conservative_and_smaller_model_fixes() -> None:
    params = PRESETS[PresetName.AGGRESSIVE].model_copy(update={"target_modules": ("all-linear",)})
    est = estimate("qwen2.5-32b", params, gpu="A100-40GB")
    kinds = {f.kind: f for f in est.fixes}
    assert "conservative_preset" in kinds
    assert kinds["conservative_preset"].diff["lora_rank"] == 8
    smaller = kinds["smaller_model"]
    assert smaller.diff["base_model"] != "Qwen/Qwen2.5-32B"
    assert smaller.diff["base_model"].startswith("Qwen/")  # same family preferred
    assert smaller.fits


def test_4bit_fix_when_weights_do_not_fit() -> None:
    params = TrainingParams(batch_size=1, max_seq_length=512)
    est = estimate("llama-3-70b", params)
    assert est.risk == Risk.HIGH  # 141 GB of bf16 weights
    quant = next(f for f in est.fixes if f.kind == "quantize_4bit")
    assert quant.diff == {"quantization": "nf4"}
    assert quant.fits
    assert est.top_fix is quant


def test_duration_and_cost_ranges() -> None:
    params = resolve(None, {"batch_size": 1, "max_seq_length": 1024}).params
    est = estimate("llama-3-8b", params, dataset=_dataset(), pricing="on_demand")
    assert est.duration is not None
    assert est.cost is not None
    assert 0 < est.duration.hours.low < est.duration.hours.high
    assert est.duration.reason
    assert est.cost is est.cost_on_demand
    assert est.cost_spot is not None
    assert est.cost_on_demand is not None
    assert est.cost_spot.total.high < est.cost_on_demand.total.high
    assert [line.name for line in est.cost.lines] == ["base training", "storage", "buffer"]
    base = est.cost.lines[0]
    assert base.low_usd == pytest.approx(est.duration.hours.low * 7.99)
    # more epochs -> longer; QLoRA -> slower per token
    longer = estimate("llama-3-8b", params.model_copy(update={"epochs": 6}), dataset=_dataset()).duration
    assert longer is not None
    assert longer.hours.low > est.duration.hours.low
    qlora = estimate(
        "llama-3-8b",
        params.model_copy(update={"quantization": QuantizationMode.NF4}),
        dataset=_dataset(),
    ).duration
    assert qlora is not None
    assert qlora.hours.high > est.duration.hours.high


def test_without_dataset_no_duration_or_cost() -> None:
    est = estimate("llama-3-8b", TrainingParams())
    assert est.duration is None
    assert est.cost is None


def test_assumed_dataset_gives_a_duration() -> None:
    ds = DatasetTokenStats.assumed(num_examples=1000, mean_tokens=512)
    est = estimate("llama-3.2-1b", TrainingParams(), dataset=ds)
    assert est.duration is not None
    assert ds.truncated_share(512) is None


def test_cpu_device_from_the_cpu_gpu_entry() -> None:
    est = estimate("llama-3.2-1b", TrainingParams(batch_size=1, max_seq_length=512), gpu="cpu")
    assert est.device == "cpu"
    assert est.total_bytes == est.allocated_bytes


def test_local_folder_model(tmp_path: object) -> None:
    import json
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 172,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 1024,
                "tie_word_embeddings": False,
            }
        )
    )
    est = estimate(str(folder), TrainingParams(), gpu="cpu")
    assert est.model_id == str(folder)
    assert est.risk == Risk.LOW


def test_fast_enough_for_every_create_job() -> None:
    params = resolve(None, {}).params
    ds = _dataset()
    estimate("llama-3-8b", params, dataset=ds)
    start = time.perf_counter()
    for _ in range(50):
        estimate("llama-3-8b", params, dataset=ds, with_fixes=False)
    assert (time.perf_counter() - start) / 50 < 0.005  # ~0.05 ms measured; slack for CI load
