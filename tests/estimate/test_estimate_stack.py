"""The software-stack facts of the memory model (memory.Stack), by hand, and the
published-figure accuracy they give (bench/estimate_accuracy.py, GPU-free part)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from brightrun_server.domain.estimate.catalog import gpu_catalog, resolve_model
from brightrun_server.domain.estimate.memory import (
    PAGED_MIN_NUMEL,
    TRAINER_STACK,
    Stack,
    memory_breakdown,
    optimizer_state_bytes,
    weight_bytes,
)
from brightrun_trainer.spec import QuantizationMode, TrainingParams

ROOT = Path(__file__).resolve().parents[2]
LLAMA3_8B = resolve_model("meta-llama/Meta-Llama-3-8B")
LLAMA32_1B = resolve_model("meta-llama/Llama-3.2-1B")
DEFAULTS = gpu_catalog().defaults
QV = ("q_proj", "v_proj")
KEPT = "4-bit matmul inputs (bitsandbytes < 0.43.2)"


def _params(**kw: Any) -> TrainingParams:
    base: dict[str, Any] = {
        "lora_rank": 32,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": QV,
        "batch_size": 2,
        "max_seq_length": 512,
        "quantization": QuantizationMode.NF4,
    }
    base.update(kw)
    return TrainingParams(**base)


def test_trainer_stack_is_the_default_and_keeps_no_matmul_inputs() -> None:
    params = _params()
    default = memory_breakdown(LLAMA3_8B, params, device="cuda", defaults=DEFAULTS)
    explicit = memory_breakdown(LLAMA3_8B, params, device="cuda", defaults=DEFAULTS, stack=TRAINER_STACK)
    assert default == explicit
    # bitsandbytes >= 0.43.2 (the trainer needs >= 0.46) keeps only the weight.
    assert all(it.name != KEPT for it in default.items)


@pytest.mark.parametrize("outlives", [False, True])
def test_old_bitsandbytes_keeps_one_input_per_distinct_linear_input(outlives: bool) -> None:
    stack = Stack(bnb_keeps_matmul_input=True, graph_outlives_step=outlives)
    bd = memory_breakdown(LLAMA3_8B, _params(), device="cuda", defaults=DEFAULTS, stack=stack)
    h, q, i = 4096, 4096, 14336
    # q/k/v share the normed input (h), o reads the attention output (q), gate/up
    # share the second normed input (h), down reads the SwiGLU product (i); bf16.
    per_token = (h + q + h + i) * 2
    assert bd.item(KEPT).bytes == (2 if outlives else 1) * 32 * per_token * 1024


def test_old_bitsandbytes_term_needs_nf4_and_no_checkpointing() -> None:
    stack = Stack(bnb_keeps_matmul_input=True)
    for params in (_params(quantization=QuantizationMode.NONE), _params(gradient_checkpointing=True)):
        bd = memory_breakdown(LLAMA3_8B, params, device="cuda", defaults=DEFAULTS, stack=stack)
        assert all(it.name != KEPT for it in bd.items)


def test_nf4_without_double_quant_and_quantized_untied_head() -> None:
    linear = LLAMA32_1B.quantizable_params()
    head = 128256 * 2048
    stack = Stack(nf4_double_quant=False, untied_lm_head=True, quantize_lm_head=True)
    got = weight_bytes(LLAMA32_1B, QuantizationMode.NF4, "cuda", stack)[0]
    quant = linear + head
    rest = LLAMA32_1B.parameter_count() + head - quant
    assert got == int(quant * 0.5 + quant / 64 * 4) + 2 * rest
    # transformers keeps a tied head tied and in 16-bit: the trainer's weights.
    plain = weight_bytes(LLAMA32_1B, QuantizationMode.NF4, "cuda")[0]
    assert plain == int(linear * 0.5 + linear / 64 + linear / (64 * 256) * 4) + 2 * (
        LLAMA32_1B.parameter_count() - linear
    )


def test_untied_head_adds_a_copy_in_16_bit() -> None:
    n = LLAMA32_1B.parameter_count()
    got = weight_bytes(LLAMA32_1B, QuantizationMode.NONE, "cuda", Stack(untied_lm_head=True))[0]
    assert got == 2 * (n + 128256 * 2048)


def test_paged_adamw_counts_only_small_tensors() -> None:
    params = _params()
    paged, _ = optimizer_state_bytes(LLAMA3_8B, params, Stack(optimizer="paged_adamw"))
    # A (32 x 4096) and B (4096 x 32 for q, 1024 x 32 for v): only v's B is small.
    assert 32 * 4096 >= PAGED_MIN_NUMEL > 32 * 1024
    assert paged == 32 * (32 * 1024) * 8
    adamw, _ = optimizer_state_bytes(LLAMA3_8B, params, Stack(adapter_bytes=2))
    assert adamw == 32 * 32 * (4096 + 4096 + 4096 + 1024) * 4


def test_bf16_adapters_and_fused_qkv_dropout_shrink_lora_activations() -> None:
    params = _params(quantization=QuantizationMode.NONE, target_modules=("q_proj", "k_proj", "v_proj"))
    peft = memory_breakdown(LLAMA3_8B, params, device="cuda", defaults=DEFAULTS, padded=False)
    lit = memory_breakdown(
        LLAMA3_8B,
        params,
        device="cuda",
        defaults=DEFAULTS,
        padded=False,
        stack=Stack(adapter_bytes=2, fused_qkv_dropout=True),
    )
    act = "activations (batch=2, seq=512)"
    # PEFT: three fp32 dropout outputs + bool masks (3 x 5 B x h) and fp32 A outputs;
    # LitGPT: one bf16 dropout output + mask (3 B x h) and bf16 A outputs.
    per_token = 3 * 5 * 4096 + 3 * 32 * 4 - (3 * 4096 + 3 * 32 * 2)
    assert peft.item(act).bytes - lit.item(act).bytes == 32 * per_token * 1024


def test_quantized_head_backward_can_be_the_peak() -> None:
    stack = Stack(
        quantize_lm_head=True,
        untied_lm_head=True,
        logit_bytes=8,
        logit_chunk_positions=128,
        head_backward_logit_bytes=6,
        dequant_bytes_per_weight=4,
    )
    bd = memory_breakdown(LLAMA32_1B, _params(), device="cuda", defaults=DEFAULTS, stack=stack)
    v, h, t = 128256, 2048, 1024
    loss_bw = 8 * v * t + 8 * 2 * 128 * v
    head_bw = 6 * v * t + 4 * v * h
    assert head_bw > loss_bw
    assert bd.item("logits and loss").bytes == head_bw
    lora = memory_breakdown(
        LLAMA32_1B, _params(quantization=QuantizationMode.NONE), device="cuda", defaults=DEFAULTS, stack=stack
    )
    assert lora.item("logits and loss").bytes == loss_bw


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("estimate_accuracy", ROOT / "bench" / "estimate_accuracy.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_published_figures_within_the_goals() -> None:
    """The issue's goal against published GPU peaks: median <= 10 %, worst <= 25 %."""
    summary = _bench().published()["all"]
    assert summary["n"] >= 15
    assert summary["median_abs_rel_error"] <= 0.10
    assert summary["worst_abs_rel_error"] <= 0.25
