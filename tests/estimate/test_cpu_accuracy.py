"""The breakdown, evaluated for a CPU in fp32, against measured training peaks.

Each configuration trains a tiny Llama for real in a fresh process
(cpu_memory.py: peak RSS minus the baseline taken after imports and a warm-up)
and must land within 15 % of the estimate. Sizes are chosen so that the model
weights are under 60 % of the peak: activations, logits, adapters and optimizer
state decide whether the test passes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from brightrun_server.domain.estimate.catalog import ModelArch, gpu_catalog
from brightrun_server.domain.estimate.memory import memory_breakdown
from brightrun_trainer.spec import TrainingParams

pytest.importorskip("torch")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parent))
import cpu_memory

if not Path("/proc/self/clear_refs").exists():  # pragma: no cover - Linux only
    pytest.skip("needs /proc/self/clear_refs (Linux)", allow_module_level=True)

CONFIGS = [
    {"rank": 8, "batch": 1},
    {"rank": 64, "batch": 1},
    {"rank": 8, "batch": 8},
    {"rank": 64, "batch": 8},
    {"rank": 16, "batch": 4, "layers": 8},
    {"rank": 8, "batch": 8, "gradient_checkpointing": True},
]


def estimate_cpu(cfg: dict[str, Any]) -> tuple[int, int]:
    arch = ModelArch(
        id="tiny",
        family="llama",
        num_layers=cfg["layers"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        vocab_size=cfg["vocab"],
        tie_word_embeddings=False,
        max_position_embeddings=max(1024, cfg["seq"]),
        dtype="float32",
    )
    params = TrainingParams(
        lora_rank=cfg["rank"],
        lora_alpha=cfg["alpha"],
        lora_dropout=cfg["dropout"],
        target_modules=tuple(cfg["targets"]),
        batch_size=cfg["batch"],
        max_seq_length=cfg["seq"],
        gradient_checkpointing=cfg["gradient_checkpointing"],
    )
    bd = memory_breakdown(arch, params, device="cpu", defaults=gpu_catalog().defaults, padded=False)
    return bd.total_bytes, bd.item("base model (none)").bytes


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("over", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cpu_estimate_within_15_percent_of_measured_peak(over: dict[str, Any]) -> None:
    cfg = dict(cpu_memory.DEFAULT, **over)
    measured = cpu_memory.measure(cfg)["measured_bytes"]
    estimated, weights = estimate_cpu(cfg)
    assert weights < 0.6 * measured, "weights dominate: the test could not fail"
    error = abs(estimated - measured) / measured
    assert error <= 0.15, f"estimate {estimated / 2**20:.0f} MiB vs measured {measured / 2**20:.0f} MiB"
