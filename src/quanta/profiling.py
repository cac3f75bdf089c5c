"""`quanta profile`: measure the real engine's step times over a grid of batch compositions.

The result (quanta.sim.calibrate.Profile, JSON) calibrates the simulator's cost model for this device.
Steps are measured as the engine runs them: the ModelExecutor with sampling, block tables laid out as the
engine's allocator lays them out (contiguous runs, at a different place of the KV pool each run), and the
host time the EngineCore spends around each step (measure_host). Times are wall-clock, or with clock="cpu" the CPU time of the calling thread (what a
step costs on a core of its own; on a machine shared with other jobs, wall time also counts theirs).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quanta.config import CacheConfig, SchedulerConfig
from quanta.kv.manager import KVCacheManager, cdiv
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

    from quanta.model.loader import physical_memory

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
        mem = float(physical_memory())
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


TIMERS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


class ThreadTimeClock:
    """An engine clock (quanta.engine.clock.Clock) that reads the CPU time of the thread that made it.

    Time other processes take from the core does not pass on it, so on a shared machine an engine run
    on this clock (with one torch thread: every op runs on the calling thread) sees the step times it
    would have on a core of its own. CPU time does not pass in sleep, so an idle wait jumps, as the
    simulator's VirtualClock does."""

    def __init__(self) -> None:
        self._origin = time.thread_time()

    def now(self) -> float:
        return time.thread_time() - self._origin

    def advance(self, seconds: float) -> None:
        pass  # CPU time passes by itself while the step computes

    def wait_until(self, t: float) -> None:
        self._origin -= max(0.0, t - self.now())

    def unix_offset(self) -> float:
        return 0.0


class TimedExecutor:
    """An executor whose StepResult.elapsed is `timer`'s reading around the wrapped one's execute (the
    wall clock, or the thread's CPU time); everything else is the wrapped executor's."""

    def __init__(self, executor: Any, timer: Callable[[], float]) -> None:
        self.executor, self.timer = executor, timer

    def execute(self, plan: StepPlan) -> Any:
        start = self.timer()
        result = self.executor.execute(plan)
        result.elapsed = self.timer() - start
        return result

    def __getattr__(self, name: str) -> Any:  # num_kv_blocks, generator state, KV reads, ...
        return getattr(self.executor, name)


_BLOCK_SIZE = 16


def _run_blocks(num_tokens: int) -> int:
    """Blocks of a request of `num_tokens` in _plan: whole block groups, as the KV manager grows it."""
    group = KVCacheManager.GROUP
    return cdiv(cdiv(num_tokens, _BLOCK_SIZE), group) * group


def _plan(
    step_id: int, batch: Batch, vocab_size: int, first_block: int = 0, pool_blocks: int | None = None
) -> StepPlan:
    """A plan of `batch` whose requests' blocks are contiguous runs of block ids from `first_block`
    (wrapping round a pool of `pool_blocks`), request after request, each in whole block groups, as
    the engine's KV manager (block groups on, the default) allocates requests admitted together: in
    sim_fidelity's real run 98% of adjacent block-table entries of decodes were consecutive blocks.
    The layout matters on a CPU: decode attention over blocks scattered at random took about twice the
    time per context token (the hardware prefetcher follows a run, not a scatter), which made every
    profiled decode step slow."""
    plan = StepPlan(step_id)
    next_block = first_block
    for i, (cached, new) in enumerate(batch):
        tokens = [(7 * i + j) % vocab_size for j in range(cached + new)]
        req = Request(f"p{step_id}-{i}", tokens, SamplingParams(max_tokens=1, ignore_eos=True), 0.0)
        req.num_computed_tokens = cached
        ids = np.arange(next_block, next_block + _run_blocks(cached + new))
        if pool_blocks is not None:
            ids %= pool_blocks
        plan.scheduled.append(ScheduledRequest(req, new, cached, ids.tolist(), True))
        next_block += len(ids)
    plan.num_batched_tokens = sum(n for _, n in batch)
    return plan


def _measure(
    executor: Any, batches: list[Batch], vocab_size: int, repeats: int, pool_blocks: int | None = None
) -> list[list[float]]:
    """Seconds (the executor's elapsed) of `repeats` runs of each batch. Each run executes its
    plan twice back to back and keeps the second: a running engine's step follows one of nearly the same
    shape on the same blocks (a decode step follows decode steps), whose warmth (caches, the allocator's
    free memory) a plan measured right after another shape lacks; measured cold, small decode steps
    came out 15-40% slower than the real engine's. The runs go round the whole list `repeats` times
    rather than repeating one batch: a burst of other load on a shared machine then slows one run of
    many batches, which the median drops, instead of every run of one. With `pool_blocks`, each run's
    blocks start at a random block of a pool of that many (as the engine's requests sit all over it)."""
    rng = np.random.default_rng(0)
    runs: list[list[float]] = [[] for _ in batches]
    for _ in range(repeats):
        for i, (batch, times) in enumerate(zip(batches, runs)):
            first = int(rng.integers(pool_blocks)) if pool_blocks else 0
            plan = _plan(i, batch, vocab_size, first, pool_blocks)
            executor.execute(plan)
            times.append(executor.execute(plan).elapsed)
    return runs


def measure_host(
    executor: Any,
    clock: Any,
    max_model_len: int,
    vocab_size: int,
    num_requests: int = 24,
    seed: int = 0,
) -> tuple[float, float, int]:
    """The EngineCore's host time around the executor: run a small workload through the real
    EngineCore (scheduler, KV manager, update, the run_arrivals loop) with `executor` and `clock`, and
    fit (seconds per step, seconds per scheduled request) to each step's time from its start to the next
    step's start less the executor's elapsed. Returns the fit and the number of steps it used."""
    from quanta.engine.arrivals import run_arrivals
    from quanta.engine.core import EngineCore

    rng = np.random.default_rng(seed)
    sc = SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=max_model_len)
    core = EngineCore(executor, clock, sc, CacheConfig(16))
    reqs = [
        Request(
            f"host{i}",
            rng.integers(0, vocab_size, int(rng.integers(8, 160))).tolist(),
            SamplingParams(max_tokens=int(rng.integers(8, 48)), ignore_eos=True),
            arrival_time=0.0,
        )
        for i in range(num_requests)
    ]
    steps: list[tuple[int, float, float]] = []  # (scheduled requests, start, executor's elapsed)
    run_arrivals(
        core, reqs, on_step=lambda out: steps.append((len(out.plan.scheduled), out.start, out.result.elapsed))
    )
    n = np.array([s[0] for s in steps[:-1]], dtype=float)
    host = np.array([b[1] - a[1] - a[2] for a, b in itertools.pairwise(steps)])
    # Least squares on the middle 80% (a stray pause, e.g. the garbage collector, is not host time).
    lo, hi = np.percentile(host, [10, 90])
    keep = (host >= lo) & (host <= hi)
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones(keep.sum()), n[keep]], 1), host[keep], rcond=None)
    if b < 0:  # noise: no per-request cost to speak of
        a, b = float(np.median(host[keep])), 0.0
    return max(float(a), 0.0), float(b), int(keep.sum())


def run_profile(
    model_path: str | Path,
    device: str = "cpu",
    dtype: str = "auto",
    repeats: int = 3,
    grid: list[Batch] | None = None,
    step_grid: GridAxes | None = GridAxes(),  # frozen: a shared default is safe
    clock: str = "wall",
    executor: Any = None,
    load_format: str = "auto",
) -> Profile:
    """Measure `grid` (default: default_grid) for the roofline fit and, unless `step_grid` is None,
    the step grid and the engine's host time per step; the profile chooses the grid model where the
    fitted roofline misses by more than calibrate.ROOFLINE_TOLERANCE. `clock`: "wall" or "cpu" (the
    calling thread's CPU time; see ThreadTimeClock). `executor`: an already loaded ModelExecutor of this
    model to measure (an engine's, with blocks of 16 tokens and a KV pool that holds the largest plan)
    instead of loading one (a profile meant to price that engine's steps measures what it runs: loads
    of one model once differed by up to 13% per decode step on a CPU, where their weights' pages landed).
    Its KV pool is overwritten (anything its engine's prefix cache indexed is then garbage).
    `load_format` "dummy": random weights made on the device (a model folder of a config alone)."""
    if clock not in TIMERS:
        raise ValueError(f"unknown clock {clock!r}; choose {' or '.join(TIMERS)}")
    if repeats < 1:  # before the model loads: a step measured no times has no median
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    from quanta.engine.clock import WallClock
    from quanta.executor.model_executor import ModelExecutor
    from quanta.model.config import ModelConfig
    from quanta.model.loader import model_path as resolve_model_path

    model_path = resolve_model_path(model_path, dtype, device)
    cfg = ModelConfig.from_folder(model_path)
    max_len = min(cfg.max_position_embeddings, 2048)
    grid = grid or default_grid(max_len)
    axes = step_grid.fitted(max_len) if step_grid is not None else None
    shaped = grid_batches(axes) if axes is not None else {}
    batches = [*grid, *shaped.values()]
    block_size = _BLOCK_SIZE  # _plan's
    max_blocks = max(sum(_run_blocks(c + n) for c, n in batch) for batch in batches)
    pool_blocks = max(max_blocks, cdiv(max_len, block_size))
    if executor is not None:
        if executor.block_size != block_size or executor.num_kv_blocks < pool_blocks:
            raise ValueError(
                f"the executor to profile needs blocks of {block_size} tokens and at least {pool_blocks} of "
                f"them (it has {executor.num_kv_blocks} of {executor.block_size})"
            )
        model_executor = executor
    else:
        model_executor = ModelExecutor(
            model_path,
            CacheConfig(block_size, num_blocks=pool_blocks),
            max_len,
            max(len(b) for b in batches),
            dtype=dtype,
            device=device,
            model_config=cfg,
            max_num_batched_tokens=max(512, *(sum(n for _, n in b) for b in batches)),
            load_format=load_format,
        )
    executor = TimedExecutor(model_executor, TIMERS[clock])
    samples = _measure(executor, batches, cfg.vocab_size, repeats, pool_blocks)
    # Each point keeps its samples, so that merge_profiles can take the median of all of them.
    points = [
        {"batch": [list(x) for x in batch], "num_sampled": len(batch), "seconds": statistics.median(t), "samples": t}
        for batch, t in zip(batches, samples)
    ]
    flops, bandwidth, mem = measure_device(device, model_executor.dtype)
    name = device if not device.startswith("cuda") else f"{device} ({_cuda_name(device)})"
    prof = Profile(name, flops, bandwidth, mem, model_executor.dtype.itemsize, cfg, points)
    if axes is not None:
        clk = ThreadTimeClock() if clock == "cpu" else WallClock()
        host_s, host_per_request, _ = measure_host(executor, clk, max_len, cfg.vocab_size)
        prof.step_grid = _grid_of(points, axes, (host_s, host_per_request)).to_dict()
        if fit(prof).mean_abs_rel_error > ROOFLINE_TOLERANCE:
            prof.step_model = "grid"
    return prof


def _grid_of(points: list[dict], axes: GridAxes, host: tuple[float, float]) -> StepGrid:
    """The step grid of a profile's points: grid_batches(axes) are its last ones, in that order."""
    shaped = grid_batches(axes)
    tail = points[len(points) - len(shaped) :]
    if len(tail) != len(shaped) or any(p["batch"] != [list(x) for x in b] for p, b in zip(tail, shaped.values())):
        raise ValueError("the profile's last points are not its step grid's batches")
    times = {shape: p["seconds"] for shape, p in zip(shaped, tail)}
    return StepGrid.from_measurements(
        list(axes.prefill), list(axes.decodes), list(axes.context), list(axes.prefill_context), times, host
    )


def merge_profiles(profiles: list[Profile]) -> Profile:
    """One profile from several measured on one machine with the same grids at different times (e.g.
    before and after a run they should describe), so that a load that drifts over the runs counts at its
    average. Where every point kept its samples, each step time is the median of all of them and the
    step grid is built anew from those: a burst of other load on the machine (which slows every step
    measured in a second or two by 20-60% on the shared VM) then moves no point, where a mean of each
    part's medians (of 2 samples: their mean) let it move a point by a quarter of it and biased the
    profile slow. Otherwise each step time is the mean of theirs. The step model is chosen again on the
    merged points."""
    first = profiles[0]
    if any(
        [p["batch"] for p in q.points] != [p["batch"] for p in first.points]
        or (q.step_grid is None) != (first.step_grid is None)
        for q in profiles
    ):
        raise ValueError("profiles to merge must measure the same steps")
    k = len(profiles)
    pooled = all("samples" in p for q in profiles for p in q.points)
    points = []
    for i, pt in enumerate(first.points):
        if pooled:
            samples = [x for q in profiles for x in q.points[i]["samples"]]
            points.append({**pt, "seconds": statistics.median(samples), "samples": samples})
        else:
            points.append({**pt, "seconds": sum(q.points[i]["seconds"] for q in profiles) / k})
    merged = Profile(
        first.device,
        statistics.median(q.device_peak_flops for q in profiles),
        statistics.median(q.device_mem_bandwidth for q in profiles),
        first.device_mem_bytes,
        first.dtype_bytes,
        first.model,
        points,
    )
    if first.step_grid is not None:
        grids = [q.step_grid for q in profiles]
        grid = dict(first.step_grid)
        for key in ("host_seconds", "host_per_request"):
            grid[key] = float(np.mean([g.get(key, 0.0) for g in grids]))  # type: ignore[union-attr]
        if pooled:
            g0 = first.step_grid
            axes = GridAxes(*(tuple(g0[a]) for a in ("prefill", "decodes", "context", "prefill_context")))
            grid = _grid_of(points, axes, (grid["host_seconds"], grid["host_per_request"])).to_dict()
        else:
            for key in ("seconds", "extra"):
                grid[key] = np.mean([np.asarray(g[key]) for g in grids], axis=0).tolist()  # type: ignore[index]
        merged.step_grid = StepGrid.from_dict(grid).to_dict()
        if fit(merged).mean_abs_rel_error > ROOFLINE_TOLERANCE:
            merged.step_model = "grid"
    return merged


def _cuda_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))
