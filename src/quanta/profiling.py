"""`quanta profile`: measure the real engine's step times over a grid of batch compositions.

The result (quanta.sim.calibrate.Profile, JSON) calibrates the simulator's cost model for this device.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from quanta.config import CacheConfig
from quanta.kv.manager import cdiv
from quanta.request import Request
from quanta.sampling_params import SamplingParams
from quanta.sched.plan import ScheduledRequest, StepPlan
from quanta.sim.calibrate import Profile

Batch = list[tuple[int, int]]  # (cached tokens, new tokens) per request


def default_grid(max_model_len: int) -> list[Batch]:
    grid: list[Batch] = []
    for new in (16, 64, 256, 512):
        for cached in (0, 256):
            if cached + new < max_model_len:
                grid.append([(cached, new)])
    for batch in (1, 4, 16, 64):
        for ctx in (64, 512):
            if ctx < max_model_len:
                grid.append([(ctx, 1)] * batch)
    grid.append([(256, 1)] * 8 + [(0, 256)])  # a mixed step, as Sarathi-Serve builds them
    return grid


def measure_device(device: str, dtype: object) -> tuple[float, float, float]:
    """Matmul FLOP/s in the model dtype, copy bandwidth (bytes/s) and memory size of the device."""
    import torch

    dev = torch.device(device)
    n = 2048
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    buf = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)

    def timed(fn, reps: int) -> float:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    flops = 2 * n**3 / timed(lambda: a @ b, 5)
    bandwidth = 2 * buf.numel() / timed(lambda: dst.copy_(buf), 5)
    if dev.type == "cuda":
        mem = float(torch.cuda.get_device_properties(dev).total_memory)
    else:
        mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return flops, bandwidth, mem


def run_profile(
    model_path: str | Path,
    device: str = "cpu",
    dtype: str = "auto",
    repeats: int = 3,
    grid: list[Batch] | None = None,
) -> Profile:
    from quanta.executor.model_executor import ModelExecutor
    from quanta.model.config import ModelConfig
    from quanta.model.loader import model_path as resolve_model_path

    model_path = resolve_model_path(model_path, dtype)
    cfg = ModelConfig.from_folder(model_path)
    max_len = min(cfg.max_position_embeddings, 2048)
    grid = grid or default_grid(max_len)
    block_size = 16
    max_blocks = max(sum(cdiv(c + n, block_size) for c, n in batch) for batch in grid)
    executor = ModelExecutor(
        model_path,
        CacheConfig(block_size, num_blocks=max(max_blocks, cdiv(max_len, block_size))),
        max_len,
        max(len(b) for b in grid),
        dtype=dtype,
        device=device,
        model_config=cfg,
    )
    points = []
    for step_id, batch in enumerate(grid):
        plan = StepPlan(step_id)
        next_block = 0
        for i, (cached, new) in enumerate(batch):
            tokens = [(7 * i + j) % cfg.vocab_size for j in range(cached + new)]
            req = Request(f"p{step_id}-{i}", tokens, SamplingParams(max_tokens=1, ignore_eos=True), 0.0)
            req.num_computed_tokens = cached
            nb = cdiv(cached + new, block_size)
            plan.scheduled.append(
                ScheduledRequest(req, new, cached, list(range(next_block, next_block + nb)), True)
            )
            next_block += nb
        plan.num_batched_tokens = sum(n for _, n in batch)
        executor.execute(plan)  # warm-up
        seconds = statistics.median(executor.execute(plan).elapsed for _ in range(repeats))
        points.append({"batch": [list(x) for x in batch], "num_sampled": len(batch), "seconds": seconds})
    flops, bandwidth, mem = measure_device(device, executor.dtype)
    name = device if not device.startswith("cuda") else f"{device} ({_cuda_name(device)})"
    return Profile(name, flops, bandwidth, mem, executor.dtype.itemsize, cfg, points)


def _cuda_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))
