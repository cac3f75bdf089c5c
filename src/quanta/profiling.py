"""`quanta profile`: measure the real engine's step times over a grid of batch compositions.

The result (quanta.sim.calibrate.Profile, JSON) calibrates the simulator's cost model for this device.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from quanta.config import CacheConfig
from quanta.kv.manager import cdiv
from quanta.request import Request
from quanta.sampling_params import SamplingParams
from quanta.sched.plan import ScheduledRequest, StepPlan
from quanta.sim.calibrate import ROOFLINE_TOLERANCE, Profile, fit
from quanta.sim.step_grid import StepGrid

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


@dataclass(frozen=True, slots=True)
class GridAxes:
    """Where `quanta profile` measures the step grid (quanta.sim.step_grid): prefill tokens, decodes,
    mean decode context, prefill context. Values past the model's context are dropped."""

    prefill: tuple[int, ...] = (0, 16, 64, 128, 256, 512)
    decodes: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)
    context: tuple[int, ...] = (16, 256, 1024, 2048)
    prefill_context: tuple[int, ...] = (0, 128, 512, 1024)

    def fitted(self, max_model_len: int) -> GridAxes:
        def keep(axis: tuple[int, ...], limit: int) -> tuple[int, ...]:
            kept = tuple(x for x in axis if x < limit)
            if len(kept) < 2:
                raise ValueError(f"max_model_len {max_model_len} leaves too few step-grid points")
            return kept

        prefill = keep(self.prefill, max_model_len)
        return GridAxes(
            prefill,
            self.decodes,
            keep(self.context, max_model_len),
            keep(self.prefill_context, max_model_len - prefill[-1]),
        )


Shape = tuple[int, int, int, int]  # (prefill tokens, decodes, decode context, prefill context)


def grid_batches(axes: GridAxes) -> dict[Shape, Batch]:
    """The batches StepGrid.from_measurements needs: D decodes after C tokens each, then one prefill
    chunk of P tokens after Q cached tokens."""
    c0 = axes.context[0]
    shapes: list[Shape] = []
    for p in axes.prefill:
        for d in axes.decodes:
            if p or d:
                shapes += [(p, d, c, 0) for c in (axes.context if d else (c0,))]
        if p:
            shapes += [(p, 0, c0, q) for q in axes.prefill_context[1:]]
    return {(p, d, c, q): [(c, 1)] * d + ([(q, p)] if p else []) for p, d, c, q in shapes}


def _plan(step_id: int, batch: Batch, vocab_size: int) -> StepPlan:
    block_size = 16
    plan = StepPlan(step_id)
    next_block = 0
    for i, (cached, new) in enumerate(batch):
        tokens = [(7 * i + j) % vocab_size for j in range(cached + new)]
        req = Request(f"p{step_id}-{i}", tokens, SamplingParams(max_tokens=1, ignore_eos=True), 0.0)
        req.num_computed_tokens = cached
        nb = cdiv(cached + new, block_size)
        plan.scheduled.append(
            ScheduledRequest(req, new, cached, list(range(next_block, next_block + nb)), True)
        )
        next_block += nb
    plan.num_batched_tokens = sum(n for _, n in batch)
    return plan


def _measure(executor: object, batches: list[Batch], vocab_size: int, repeats: int) -> list[float]:
    """Median seconds of ModelExecutor.execute over `repeats` runs of each batch, after a warm-up pass.
    The runs go round the whole list `repeats` times rather than repeating one batch: a burst of other
    load on a shared machine then slows one run of many batches, which the median drops, instead of
    every run of one."""
    plans = [_plan(i, b, vocab_size) for i, b in enumerate(batches)]
    runs: list[list[float]] = [[] for _ in plans]
    for rep in range(repeats + 1):
        for plan, times in zip(plans, runs):
            elapsed = executor.execute(plan).elapsed  # type: ignore[attr-defined]
            if rep:
                times.append(elapsed)
    return [statistics.median(t) for t in runs]


def run_profile(
    model_path: str | Path,
    device: str = "cpu",
    dtype: str = "auto",
    repeats: int = 3,
    grid: list[Batch] | None = None,
    step_grid: GridAxes | None = GridAxes(),  # frozen: a shared default is safe
) -> Profile:
    """Measure `grid` (default: default_grid) for the roofline fit and, unless `step_grid` is None,
    the step grid; the profile chooses the grid model where the fitted roofline misses by more than
    calibrate.ROOFLINE_TOLERANCE."""
    from quanta.executor.model_executor import ModelExecutor
    from quanta.model.config import ModelConfig
    from quanta.model.loader import model_path as resolve_model_path

    model_path = resolve_model_path(model_path, dtype)
    cfg = ModelConfig.from_folder(model_path)
    max_len = min(cfg.max_position_embeddings, 2048)
    grid = grid or default_grid(max_len)
    axes = step_grid.fitted(max_len) if step_grid is not None else None
    shaped = grid_batches(axes) if axes is not None else {}
    batches = [*grid, *shaped.values()]
    block_size = 16
    max_blocks = max(sum(cdiv(c + n, block_size) for c, n in batch) for batch in batches)
    executor = ModelExecutor(
        model_path,
        CacheConfig(block_size, num_blocks=max(max_blocks, cdiv(max_len, block_size))),
        max_len,
        max(len(b) for b in batches),
        dtype=dtype,
        device=device,
        model_config=cfg,
        max_num_batched_tokens=max(sum(n for _, n in b) for b in batches),
    )
    seconds = _measure(executor, batches, cfg.vocab_size, repeats)
    points = [
        {"batch": [list(x) for x in batch], "num_sampled": len(batch), "seconds": t}
        for batch, t in zip(batches, seconds)
    ]
    flops, bandwidth, mem = measure_device(device, executor.dtype)
    name = device if not device.startswith("cuda") else f"{device} ({_cuda_name(device)})"
    prof = Profile(name, flops, bandwidth, mem, executor.dtype.itemsize, cfg, points)
    if axes is not None:
        times = dict(zip(shaped, seconds[len(grid) :]))
        prof.step_grid = StepGrid.from_measurements(
            list(axes.prefill), list(axes.decodes), list(axes.context), list(axes.prefill_context), times
        ).to_dict()
        if fit(prof).mean_abs_rel_error > ROOFLINE_TOLERANCE:
            prof.step_model = "grid"
    return prof


def _cuda_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))
