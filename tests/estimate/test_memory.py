"""Each memory formula against hand-computed values, and its invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brightrun_server.domain.estimate.catalog import ModelArch, gpu_catalog, resolve_model
from brightrun_server.domain.estimate.memory import (
    LOGIT_BYTES,
    MemoryBreakdown,
    lora_parameter_count,
    memory_breakdown,
    weight_bytes,
)
from brightrun_trainer.spec import QuantizationMode, TrainingParams

LLAMA3_8B = resolve_model("meta-llama/Meta-Llama-3-8B")
DEFAULTS = gpu_catalog().defaults


def breakdown(arch: ModelArch, params: TrainingParams, device: str = "cuda") -> MemoryBreakdown:
    return memory_breakdown(arch, params, device=device, defaults=DEFAULTS)  # type: ignore[arg-type]


def test_lora_params_llama3_8b_attention_rank16() -> None:
    params = TrainingParams(lora_rank=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    # q: 16*(4096+4096), k and v: 16*(4096+1024) each (GQA: 8 KV heads x 128), o: 16*(4096+4096)
    per_layer = 16 * (8192 + 5120 + 5120 + 8192)
    assert lora_parameter_count(LLAMA3_8B, params) == 32 * per_layer == 13_631_488


def test_lora_params_all_linear_and_mlp() -> None:
    params = TrainingParams(lora_rank=8, target_modules=("all-linear",))
    per_layer = 8 * (8192 + 5120 + 5120 + 8192 + 3 * (4096 + 14336))
    assert lora_parameter_count(LLAMA3_8B, params) == 32 * per_layer


def test_lora_params_mixtral_experts_count_every_expert() -> None:
    mixtral = resolve_model("mixtral-8x7b")
    params = TrainingParams(lora_rank=8, target_modules=("w1",))
    assert lora_parameter_count(mixtral, params) == 32 * 8 * 8 * (4096 + 14336)


def test_unknown_target_modules_add_nothing() -> None:
    params = TrainingParams(lora_rank=8, target_modules=("not_a_module",))
    assert lora_parameter_count(LLAMA3_8B, params) == 0


def test_weight_bytes_by_precision() -> None:
    n = LLAMA3_8B.parameter_count()
    assert weight_bytes(LLAMA3_8B, QuantizationMode.NONE, "cuda")[0] == 2 * n
    assert weight_bytes(LLAMA3_8B, QuantizationMode.NONE, "cpu")[0] == 4 * n
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    rest = n - linear
    nf4 = weight_bytes(LLAMA3_8B, QuantizationMode.NF4, "cuda")[0]
    # 0.5 B codes + 1 B per 64 (8-bit absmax) + 4 B per 64*256 (fp32 second level)
    assert nf4 == int(linear * 0.5 + linear / 64 + linear / (64 * 256) * 4) + 2 * rest
    # QLoRA paper: double quantization costs 0.127 bits per parameter
    overhead_bits = (nf4 - 2 * rest - linear * 0.5) * 8 / linear
    assert overhead_bits == pytest.approx(0.127, abs=0.001)
    int8 = weight_bytes(LLAMA3_8B, QuantizationMode.INT8, "cuda")[0]
    rows = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)
    assert int8 == linear + 4 * rows + 2 * rest


def test_optimizer_gradients_and_adapters_per_trainable_param() -> None:
    params = TrainingParams(lora_rank=16)
    bd = breakdown(LLAMA3_8B, params)
    n = 13_631_488
    assert bd.trainable_parameters == n
    assert bd.item("LoRA adapters (r=16)").bytes == 4 * n
    assert bd.item("optimizer state").bytes == 8 * n
    assert bd.item("gradients").bytes == 4 * n


def test_logits_term_and_activation_inventory_by_hand() -> None:
    params = TrainingParams(lora_rank=16, batch_size=1, max_seq_length=1024, lora_dropout=0.05)
    bd = breakdown(LLAMA3_8B, params)
    tokens = 1024
    assert bd.item("logits and loss").bytes == LOGIT_BYTES * 128256 * tokens
    h, q, kv, i = 4096, 4096, 1024, 14336
    norms = 2 * h * 4
    attention = (2 * q + 2 * kv) * 2 + 4 * 32  # batch 1: no padding mask, K/V at GQA width
    mlp = 3 * i * 2
    lora = 4 * 16 * 4 + (h + h + h + q) * (4 + 1)  # B inputs + fp32 dropout outputs + masks
    per_token = norms + attention + mlp + lora
    expected = 32 * per_token * tokens + h * 4 * tokens
    assert bd.item("activations (batch=1, seq=1024)").bytes == expected


def test_padding_mask_keeps_kv_at_query_width() -> None:
    params = TrainingParams(batch_size=2)
    plain = memory_breakdown(LLAMA3_8B, params, device="cuda", defaults=DEFAULTS, padded=False)
    padded = memory_breakdown(LLAMA3_8B, params, device="cuda", defaults=DEFAULTS, padded=True)
    extra = 32 * 2 * (4096 - 1024) * 2 * params.batch_size * params.max_seq_length
    assert padded.allocated_bytes - plain.allocated_bytes == extra


def test_cpu_has_no_cuda_overheads_and_cuda_does() -> None:
    params = TrainingParams()
    cpu = breakdown(LLAMA3_8B, params, "cpu")
    cuda = breakdown(LLAMA3_8B, params, "cuda")
    assert cpu.total_bytes == cpu.allocated_bytes
    assert cuda.total_bytes - cuda.reserved_bytes == DEFAULTS.cuda_context_bytes
    assert cuda.reserved_bytes > cuda.allocated_bytes


def test_longest_example_caps_the_sequence() -> None:
    params = TrainingParams(max_seq_length=2048)
    short = memory_breakdown(LLAMA3_8B, params, device="cuda", defaults=DEFAULTS, longest_example=300)
    assert short.seq_len == 300
    assert short.allocated_bytes < breakdown(LLAMA3_8B, params).allocated_bytes


def test_eager_attention_grows_quadratically() -> None:
    gemma = resolve_model("gemma-2-2b")
    a = breakdown(gemma, TrainingParams(batch_size=1, max_seq_length=1024))
    b = breakdown(gemma, TrainingParams(batch_size=1, max_seq_length=2048))
    act_a = a.item("activations (batch=1, seq=1024)").bytes
    act_b = b.item("activations (batch=1, seq=2048)").bytes
    assert act_b > 2 * act_a


MODELS = [resolve_model(m) for m in ("llama-3.2-1b", "llama-3-8b", "qwen2.5-7b", "phi-3-mini")]
TARGETS = st.sampled_from(
    [
        ("q_proj", "v_proj"),
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        ("all-linear",),
    ]
)


@st.composite
def configs(draw: st.DrawFn) -> tuple[ModelArch, TrainingParams]:
    arch = draw(st.sampled_from(MODELS))
    params = TrainingParams(
        lora_rank=draw(st.integers(4, 64)),
        batch_size=draw(st.sampled_from([1, 2, 4, 8])),
        max_seq_length=draw(st.sampled_from([512, 1024, 2048, 4096])),
        lora_dropout=draw(st.sampled_from([0.0, 0.05, 0.2])),
        gradient_checkpointing=draw(st.booleans()),
        quantization=draw(st.sampled_from(list(QuantizationMode))),
        target_modules=draw(TARGETS),
    )
    return arch, params


def _total(arch: ModelArch, params: TrainingParams, **changes: object) -> int:
    return breakdown(arch, params.model_copy(update=changes)).total_bytes


@settings(max_examples=150, deadline=None)
@given(configs(), st.sampled_from(["batch_size", "max_seq_length", "lora_rank"]))
def test_more_batch_seq_or_rank_never_lowers_the_estimate(cfg: tuple[ModelArch, TrainingParams], field: str) -> None:
    arch, params = cfg
    steps = {
        "batch_size": [1, 2, 4, 8],
        "max_seq_length": [512, 1024, 2048, 4096],
        "lora_rank": [4, 8, 16, 32, 64],
    }[field]
    totals = [_total(arch, params, **{field: v}) for v in steps]
    assert totals == sorted(totals)


@settings(max_examples=150, deadline=None)
@given(configs())
def test_4bit_never_above_8bit_never_above_16bit(cfg: tuple[ModelArch, TrainingParams]) -> None:
    arch, params = cfg
    nf4 = _total(arch, params, quantization=QuantizationMode.NF4)
    int8 = _total(arch, params, quantization=QuantizationMode.INT8)
    none = _total(arch, params, quantization=QuantizationMode.NONE)
    assert nf4 <= int8 <= none


@settings(max_examples=150, deadline=None)
@given(configs())
def test_checkpointing_never_above_without(cfg: tuple[ModelArch, TrainingParams]) -> None:
    arch, params = cfg
    assert _total(arch, params, gradient_checkpointing=True) <= _total(arch, params, gradient_checkpointing=False)


@settings(max_examples=100, deadline=None)
@given(configs())
def test_breakdown_sums_and_is_positive(cfg: tuple[ModelArch, TrainingParams]) -> None:
    arch, params = cfg
    bd = breakdown(arch, params)
    assert all(item.bytes >= 0 and item.formula for item in bd.items)
    assert bd.total_bytes == sum(item.bytes for item in bd.items)
    assert bd.allocated_bytes <= bd.reserved_bytes <= bd.total_bytes
