"""Measure the peak memory of LoRA training steps of a tiny Llama on this CPU.

Each measurement runs in a fresh child process (``python cpu_memory.py '<json>'``)
so that nothing from an earlier run is resident. The child:

1. imports torch, transformers and peft, pins torch to one thread, and runs a
   warm-up training step on a throw-away 2-layer model with the same code path, so
   that the shared-library pages, kernel caches and allocator arenas that the first
   step touches are resident *before* the baseline (they are process overhead, not
   something the estimator models);
2. writes ``5`` to ``/proc/self/clear_refs`` (resets ``VmHWM`` to the current RSS)
   and reads ``VmRSS`` as the baseline;
3. builds the model in fp32, wraps it with ``peft.get_peft_model``, makes an AdamW
   over the trainable parameters, and runs ``steps`` optimiser steps
   (``loss = model(input_ids, attention_mask, labels).loss``; ``loss.backward()``;
   ``opt.step()``; ``opt.zero_grad(set_to_none=True)``) — the loop the trainer
   runs;
4. reports ``VmHWM - baseline``: the peak resident memory the model, its adapters,
   gradients, optimiser state and activations added.

glibc is told to serve every allocation above 64 KiB with its own ``mmap``
(``MALLOC_MMAP_THRESHOLD_``, which also freezes glibc's dynamic threshold), so a
freed tensor is returned to the kernel at once and RSS follows the live tensors
instead of glibc's heap high-water mark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

DEFAULT = {
    "layers": 4,
    "hidden": 512,
    "intermediate": 1408,
    "heads": 8,
    "kv_heads": 4,
    "vocab": 32000,
    "seq": 256,
    "batch": 1,
    "rank": 8,
    "alpha": 16,
    "dropout": 0.05,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gradient_checkpointing": False,
    "steps": 2,
    "model_dir": None,
}


def measure(config: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Run one measurement in a child process; return its JSON result."""
    env = dict(os.environ)
    env.update(
        {
            "MALLOC_MMAP_THRESHOLD_": "65536",
            "MALLOC_TRIM_THRESHOLD_": "0",
            "MALLOC_ARENA_MAX": "1",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore",
        }
    )
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _train(cfg: dict[str, Any], *, build_dir: str | None) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if build_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(build_dir, dtype=torch.float32)
        vocab = model.config.vocab_size
    else:
        vocab = cfg["vocab"]
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=cfg["hidden"],
            intermediate_size=cfg["intermediate"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            num_key_value_heads=cfg["kv_heads"],
            max_position_embeddings=max(1024, cfg["seq"]),
            tie_word_embeddings=False,
            dtype="float32",
        )
        model = LlamaForCausalLM(config)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=cfg["rank"],
        lora_alpha=cfg["alpha"],
        lora_dropout=cfg["dropout"],
        target_modules=list(cfg["targets"]),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(cfg["steps"]):
        ids = torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=gen)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _child(cfg: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    torch.set_num_threads(1)
    warm = dict(cfg, layers=2, hidden=64, intermediate=176, heads=4, kv_heads=2, vocab=512, seq=32)
    warm["batch"] = 2
    warm_model = _train(warm, build_dir=None)
    del warm_model
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    baseline = _status_kib("VmRSS")
    model, opt = _train(cfg, build_dir=cfg.get("model_dir"))
    peak = _status_kib("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    del model, opt
    return {
        "baseline_bytes": baseline * 1024,
        "peak_bytes": peak * 1024,
        "measured_bytes": (peak - baseline) * 1024,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    merged = dict(DEFAULT)
    merged.update(json.loads(sys.argv[1]))
    print(json.dumps(_child(merged)))
