"""How right is the VRAM estimator? Published GPU figures and measured CPU peaks.

1. Published: every record of tests/data/estimate/published_memory.json (measured
   peak memory of LoRA / QLoRA runs, each with its source and configuration) is
   estimated with its configuration and compared with the figure it reports (the
   estimate's allocated subtotal for ``max_memory_allocated`` figures). A record
   names the training stack it was measured on (the file's ``stacks``: software
   facts such as adapter dtype or bitsandbytes version, each with its source); the
   estimate takes those facts as inputs (``memory.Stack``), nothing is fitted.
2. CPU: tiny Llama models are trained for real on this machine
   (tests/estimate/cpu_memory.py: fresh process, fp32, peak RSS minus the baseline
   measured in the same run) and compared with the same breakdown for device="cpu".

Progress goes to stderr; one JSON object is the last line of stdout.
Usage: python bench/estimate_accuracy.py [--skip-cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from brightrun_server.domain.estimate.catalog import ModelArch, gpu_catalog, resolve_model
from brightrun_server.domain.estimate.memory import Stack, memory_breakdown
from brightrun_trainer.spec import QuantizationMode, TrainingParams

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "estimate" / "published_memory.json"
UNITS = {"GB": 1e9, "GiB": 2**30}

#: CPU configurations: rank 8/64 x batch 1/8 on a 4-layer model, one with 8 layers,
#: one with gradient checkpointing. hidden 512 / vocab 32000 / seq 256 keep weights
#: (~170 MiB) well under half of the peak, so activations and logits decide the result.
CPU_CONFIGS: list[dict[str, Any]] = [
    {"rank": 8, "batch": 1},
    {"rank": 64, "batch": 1},
    {"rank": 8, "batch": 8},
    {"rank": 64, "batch": 8},
    {"rank": 16, "batch": 4, "layers": 8},
    {"rank": 8, "batch": 8, "gradient_checkpointing": True},
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def record_arch(model: str | dict[str, Any]) -> ModelArch:
    if isinstance(model, str):
        return resolve_model(model)
    fields = {k: v for k, v in model["inline"].items() if k != "source"}
    return ModelArch(**fields)


def record_params(rec: dict[str, Any]) -> TrainingParams:
    return TrainingParams(
        lora_rank=rec["lora_rank"],
        lora_alpha=rec["lora_alpha"],
        lora_dropout=rec["lora_dropout"],
        target_modules=tuple(rec["target_modules"]),
        batch_size=rec["micro_batch_size"],
        max_seq_length=rec["seq_len"],
        gradient_checkpointing=rec["gradient_checkpointing"],
        quantization=QuantizationMode(rec["quantization"]),
    )


def record_stack(rec: dict[str, Any], stacks: dict[str, Any]) -> Stack:
    """The software facts a record was measured with (default: BrightRun's trainer)."""
    name = rec.get("stack")
    if not name:
        return Stack()
    entry = stacks[name]
    facts = dict(entry["facts"])
    if rec["quantization"] != "none":
        facts.update(entry.get("when_quantized", {}))
    return Stack(**facts)


def estimate_record(rec: dict[str, Any], stacks: dict[str, Any] | None = None) -> int:
    bd = memory_breakdown(
        record_arch(rec["model"]),
        record_params(rec),
        device="cuda",
        defaults=gpu_catalog().defaults,
        stack=record_stack(rec, stacks or {}),
    )
    metric = rec["metric"]
    if metric == "max_memory_allocated":
        return bd.allocated_bytes
    if metric == "max_memory_reserved":
        return bd.reserved_bytes
    return bd.total_bytes


def published() -> dict[str, Any]:
    doc = json.loads(DATA.read_text(encoding="utf-8"))
    rows = []
    for rec in doc["records"]:
        measured = rec["measured"] * UNITS[rec["unit"]]
        est = estimate_record(rec, doc.get("stacks", {}))
        err = (est - measured) / measured
        rows.append(
            {
                "id": rec["id"],
                "method": rec["method"],
                "measured_gb": round(measured / 1e9, 2),
                "estimated_gb": round(est / 1e9, 2),
                "rel_error": round(err, 4),
            }
        )
        _log(f"{rec['id']:28s} measured {measured / 1e9:6.2f} GB  estimate {est / 1e9:6.2f} GB  {err:+.1%}")

    def summary(subset: list[dict[str, Any]]) -> dict[str, Any]:
        errs = [abs(r["rel_error"]) for r in subset]
        worst = max(subset, key=lambda r: abs(r["rel_error"]))
        return {
            "n": len(subset),
            "median_abs_rel_error": round(statistics.median(errs), 4),
            "worst_abs_rel_error": round(max(errs), 4),
            "worst_id": worst["id"],
            "mean_signed_rel_error": round(statistics.mean(r["rel_error"] for r in subset), 4),
        }

    by_method = {m: summary([r for r in rows if r["method"] == m]) for m in sorted({r["method"] for r in rows})}
    return {"all": summary(rows), "by_method": by_method, "records": rows}


def _load_cpu_memory() -> Any:
    path = ROOT / "tests" / "estimate" / "cpu_memory.py"
    spec = importlib.util.spec_from_file_location("cpu_memory", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_estimate(cfg: dict[str, Any]) -> int:
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
    return bd.total_bytes


def cpu() -> dict[str, Any]:
    cm = _load_cpu_memory()
    rows = []
    for over in CPU_CONFIGS:
        cfg = dict(cm.DEFAULT, **over)
        t0 = time.monotonic()
        result = cm.measure(cfg)
        measured = result["measured_bytes"]
        est = cpu_estimate(cfg)
        err = (est - measured) / measured
        rows.append(
            {
                "config": over,
                "measured_mib": round(measured / 2**20, 1),
                "estimated_mib": round(est / 2**20, 1),
                "baseline_mib": round(result["baseline_bytes"] / 2**20, 1),
                "rel_error": round(err, 4),
            }
        )
        _log(
            f"cpu {json.dumps(over):55s} measured {measured / 2**20:7.1f} MiB  estimate "
            f"{est / 2**20:7.1f} MiB  {err:+.1%}  ({time.monotonic() - t0:.0f} s)"
        )
    errs = [abs(r["rel_error"]) for r in rows]
    return {
        "n": len(rows),
        "median_abs_rel_error": round(statistics.median(errs), 4),
        "worst_abs_rel_error": round(max(errs), 4),
        "within_15pct": all(e <= 0.15 for e in errs),
        "runs": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-cpu", action="store_true", help="skip the CPU measurements")
    args = parser.parse_args()
    pub = published()
    out: dict[str, Any] = {
        "bench": "estimate_accuracy",
        "published": pub,
        "goals": {"median": 0.10, "worst": 0.25},
        "goal_median_met": pub["all"]["median_abs_rel_error"] <= 0.10,
        "goal_worst_met": pub["all"]["worst_abs_rel_error"] <= 0.25,
    }
    if not args.skip_cpu:
        out["cpu"] = cpu()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
