"""Catalogs: parameter counts from real shapes, lookups, local config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brightrun_server.domain.estimate.catalog import (
    UnknownGpu,
    UnknownModel,
    from_hf_config,
    from_local_dir,
    get_gpu,
    gpu_catalog,
    model_catalog,
    resolve_model,
)

REQUIRED = [
    "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3-70B",
    "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B",
    "mistralai/Mistral-7B-v0.1",
    "mistralai/Mixtral-8x7B-v0.1",
    *(f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")),
    "google/gemma-2-2b",
    "google/gemma-2-9b",
    "google/gemma-2-27b",
    "microsoft/Phi-3-mini-4k-instruct",
    "microsoft/Phi-3-medium-4k-instruct",
]


@pytest.mark.parametrize("model_id", REQUIRED)
def test_computed_parameter_count_equals_the_model_card(model_id: str) -> None:
    arch = model_catalog().get(model_id)
    assert arch is not None
    assert arch.stated_parameters is not None
    assert arch.parameter_count() == arch.stated_parameters
    assert arch.sources


def test_llama3_8b_shapes_by_hand() -> None:
    arch = resolve_model("llama-3-8b")
    assert (arch.q_dim, arch.kv_dim, arch.head_dim) == (4096, 1024, 128)
    shapes = {lin.name: (lin.in_features, lin.out_features) for lin in arch.linears()}
    assert shapes == {
        "q_proj": (4096, 4096),
        "k_proj": (4096, 1024),
        "v_proj": (4096, 1024),
        "o_proj": (4096, 4096),
        "gate_proj": (4096, 14336),
        "up_proj": (4096, 14336),
        "down_proj": (14336, 4096),
    }
    # 2 x 128256 x 4096 embeddings + 32 x (attention + MLP + 2 norms) + final norm
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert arch.parameter_count() == 2 * 128256 * 4096 + 32 * per_layer + 4096


def test_head_dim_differs_from_hidden_over_heads_for_gemma2() -> None:
    arch = resolve_model("gemma-2-9b")
    assert arch.head_dim == 256
    assert arch.q_dim == 16 * 256 != arch.hidden_size
    assert arch.tie_word_embeddings


def test_mixtral_experts_and_active_parameters() -> None:
    arch = resolve_model("mixtral-8x7b")
    assert (arch.num_local_experts, arch.num_experts_per_tok) == (8, 2)
    w1 = arch.linear("w1")
    assert w1 is not None
    assert w1.copies == 8
    assert w1.active_copies == 2
    assert arch.linear("gate_proj") == w1  # the HF name maps to the expert linear
    # ~12.9B active of 46.7B (Mistral's announcement: 12.9B active per token)
    assert 12.8e9 < arch.active_parameter_count() < 13.0e9


def test_phi3_exposes_fused_projections() -> None:
    arch = resolve_model("phi-3-mini")
    names = [lin.name for lin in arch.linears()]
    assert names == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    qkv = arch.linear("qkv_proj")
    assert qkv is not None
    assert qkv.out_features == 3 * 3072


@pytest.mark.parametrize("alias", ["llama-3-8b", "META-LLAMA/META-LLAMA-3-8B", "Meta-Llama-3-8B", "llama3_8b"])
def test_aliases_resolve(alias: str) -> None:
    assert resolve_model(alias).id == "meta-llama/Meta-Llama-3-8B"


def test_unknown_names_raise() -> None:
    with pytest.raises(UnknownModel):
        resolve_model("no-such-model-7b")
    with pytest.raises(UnknownGpu):
        get_gpu("TPU-v9")


def test_gpu_catalog_defaults_follow_the_spec() -> None:
    cat = gpu_catalog()
    h100 = get_gpu()
    assert h100.id == cat.default_gpu == "H100-80GB"
    assert (h100.spot_usd_per_hour, h100.on_demand_usd_per_hour) == (2.49, 7.99)
    assert 79 * 2**30 < h100.memory_bytes <= 80 * 2**30
    ids = {g.id for g in cat.gpus}
    assert {"A100-80GB", "A100-40GB", "L40S-48GB", "A10G-24GB", "L4-24GB"} <= ids
    assert {"RTX4090-24GB", "cpu"} <= ids
    assert get_gpu("cpu").device == "cpu"
    for g in cat.gpus:
        assert g.spot_usd_per_hour <= g.on_demand_usd_per_hour
        assert g.bf16_dense_tflops > 0


def test_from_hf_config_defaults(tmp_path: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = from_local_dir(tmp_path)
    assert arch.num_key_value_heads == 4  # absent -> multi-head attention
    assert arch.head_dim == 16
    per_layer = 4 * 64 * 64 + 3 * 64 * 172 + 2 * 64
    assert arch.parameter_count() == 1000 * 64 + 3 * per_layer + 64
    assert resolve_model(str(tmp_path)) == arch
    qwen = from_hf_config({**config, "model_type": "qwen2", "tie_word_embeddings": False})
    assert qwen.attention_bias
    assert qwen.parameter_count() == arch.parameter_count() + 1000 * 64 + 3 * (3 * 64)


def test_missing_config_json_raises(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel):
        from_local_dir(tmp_path)


def test_local_tiny_model_matches_its_safetensors(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from brightrun_trainer.tiny import build_tiny_model, count_parameters

    out = build_tiny_model(tmp_path / "tiny", num_layers=3, hidden_size=64, num_kv_heads=2)
    arch = from_local_dir(out)
    assert arch.num_layers == 3
    assert arch.kv_dim == 32
    assert arch.parameter_count() == count_parameters(out)
