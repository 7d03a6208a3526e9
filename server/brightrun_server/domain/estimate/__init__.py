"""Pre-flight estimate of a fine-tuning job: VRAM breakdown, OOM risk, fixes, cost.

Pure and offline: the catalogs are JSON files in this package, nothing here imports
torch, transformers or grpc. Entry point::

    from brightrun_server.domain.estimate import estimate
    est = estimate("meta-llama/Meta-Llama-3-8B", params, gpu="H100-80GB",
                   pricing="spot", dataset=DatasetTokenStats.from_lengths(lengths))
    est.breakdown, est.total_bytes, est.risk, est.fixes, est.duration, est.cost
"""

from brightrun_server.domain.estimate.catalog import (
    GpuSpec,
    ModelArch,
    UnknownGpu,
    UnknownModel,
    from_hf_config,
    from_local_dir,
    get_gpu,
    gpu_catalog,
    model_catalog,
    resolve_model,
)
from brightrun_server.domain.estimate.estimator import (
    HIGH_RISK_ABOVE,
    MODERATE_RISK_FROM,
    CostEstimate,
    CostLine,
    DatasetTokenStats,
    DurationEstimate,
    Estimate,
    Fix,
    Pricing,
    Range,
    Risk,
    estimate,
    risk_band,
)
from brightrun_server.domain.estimate.memory import MemoryBreakdown, MemoryItem, memory_breakdown

__all__ = [
    "HIGH_RISK_ABOVE",
    "MODERATE_RISK_FROM",
    "CostEstimate",
    "CostLine",
    "DatasetTokenStats",
    "DurationEstimate",
    "Estimate",
    "Fix",
    "GpuSpec",
    "MemoryBreakdown",
    "MemoryItem",
    "ModelArch",
    "Pricing",
    "Range",
    "Risk",
    "UnknownGpu",
    "UnknownModel",
    "estimate",
    "from_hf_config",
    "from_local_dir",
    "get_gpu",
    "gpu_catalog",
    "memory_breakdown",
    "model_catalog",
    "resolve_model",
    "risk_band",
]
