"""GPU hourly rates by pricing tier, read from the GPU catalog
(domain/estimate/gpus.json — data, not code)."""

from __future__ import annotations

from enum import StrEnum

from brightrun_server.domain.estimate import get_gpu, gpu_catalog
from brightrun_server.domain.estimate.catalog import GpuSpec, UnknownGpu


class PricingTier(StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on_demand"


DEFAULT_GPU = gpu_catalog().default_gpu


def resolve_gpu(name: str) -> GpuSpec | None:
    """The catalog entry for an id or alias (case-insensitive); None if unknown."""
    try:
        return get_gpu(name or DEFAULT_GPU)
    except UnknownGpu:
        return None


def known_gpu_types() -> list[str]:
    return [gpu.id for gpu in gpu_catalog().gpus]


def hourly_rate(gpu: GpuSpec, tier: PricingTier) -> float:
    return gpu.spot_usd_per_hour if tier is PricingTier.SPOT else gpu.on_demand_usd_per_hour
