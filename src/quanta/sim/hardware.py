"""Accelerator specs for the cost model: dense bf16 peak, HBM bandwidth and size, interconnect.

Figures are the vendors' published dense (no sparsity) numbers; the cost model's efficiency factors
turn peaks into achieved rates, and `quanta profile` calibrates those factors on real hardware.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GPUSpec:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    mem_bandwidth: float  # HBM/GDDR, bytes/s
    mem_bytes: float
    link_bandwidth: float  # per-GPU interconnect for tensor parallelism (NVLink or PCIe), bytes/s
    # Host <-> device copies (KV swapping), achieved bytes/s: PCIe 4.0 x16 ~25 GB/s, PCIe 5.0 ~50 GB/s.
    host_link_bandwidth: float = 25e9


_T, _G = 1e12, 1e9
GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        GPUSpec("a10", 125 * _T, 600 * _G, 24 * 2**30, 64 * _G),
        GPUSpec("l4", 121 * _T, 300 * _G, 24 * 2**30, 64 * _G),
        GPUSpec("a100-40gb", 312 * _T, 1555 * _G, 40 * 2**30, 600 * _G),
        GPUSpec("a100-80gb", 312 * _T, 2039 * _G, 80 * 2**30, 600 * _G),
        GPUSpec("h100", 989 * _T, 3350 * _G, 80 * 2**30, 900 * _G, 50 * _G),
        GPUSpec("h200", 989 * _T, 4800 * _G, 141 * 2**30, 900 * _G, 50 * _G),
    )
}
ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "h100-80gb": "h100"}


def get_gpu(name: str) -> GPUSpec:
    key = ALIASES.get(name.lower(), name.lower())
    try:
        return GPUS[key]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; choose from {', '.join(GPUS)}") from None
