"""quanta.profiling's measurement parts: the CPU-time clock, the timed executor, scattered block
tables and the engine's host time, on the real tiny model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from quanta.config import CacheConfig
from quanta.engine.clock import WallClock
from quanta.profiling import TIMERS, ThreadTimeClock, TimedExecutor, _plan, measure_host
from quanta.request import Request
from quanta.sampling_params import SamplingParams


def test_thread_time_clock_skips_sleep_and_jumps_idle_waits() -> None:
    clock = ThreadTimeClock()
    t0 = clock.now()
    time.sleep(0.05)  # no CPU time passes
    assert clock.now() - t0 < 0.02
    clock.wait_until(t0 + 5.0)
    assert 5.0 <= clock.now() < 5.02
    clock.wait_until(1.0)  # the past: no jump back
    assert clock.now() >= 5.0
    x = 0
    start = clock.now()
    while clock.now() - start < 0.02:  # busy: the clock advances
        x += 1
    assert clock.now() - start >= 0.02


def test_plan_lays_blocks_out_in_one_run_as_the_allocator_does() -> None:
    plan = _plan(0, [(40, 1), (0, 100)], 50, first_block=995, pool_blocks=1000)
    # Request after request from the first block, in whole groups of 4 blocks, round the end of the pool.
    assert [s.block_ids for s in plan.scheduled] == [[995, 996, 997, 998], [999, 0, 1, 2, 3, 4, 5, 6]]


def test_plan_layout_is_the_engine_allocators() -> None:
    """The engine's own KV manager (block groups on, as by default) gives requests admitted together
    neighbouring contiguous runs in whole groups: the layout _plan copies."""
    from quanta.kv.manager import KVCacheManager

    kv = KVCacheManager(1000, 16, block_groups=True)
    tables = []
    for i, n in enumerate((41, 100)):
        req = Request(f"r{i}", list(range(n)), SamplingParams(max_tokens=1), 0.0)
        assert kv.allocate_slots(req, n)
        tables.append(kv.block_ids(req.request_id))
    plan = _plan(0, [(40, 1), (0, 100)], 50)
    assert tables == [s.block_ids for s in plan.scheduled]


def _executor(llama_dir: Path, clock: str) -> TimedExecutor:
    from quanta.executor.model_executor import ModelExecutor

    return TimedExecutor(ModelExecutor(llama_dir, CacheConfig(16, num_blocks=256), 512, 32), TIMERS[clock])


def test_timed_executor_reports_its_timer(llama_dir: Path) -> None:
    ex = _executor(llama_dir, "cpu")
    assert ex.num_kv_blocks == 256  # the wrapped executor's
    plan = _plan(0, [(0, 32)], 100)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    result = ex.execute(plan)
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    assert len(result.sampled_token_ids) == 1
    assert 0 < result.elapsed <= cpu and result.elapsed <= wall + 1e-6


def test_measure_host_runs_the_engine_core(llama_dir: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every op on the calling thread, whose CPU time the clock reads
    try:
        for clock, name in ((ThreadTimeClock(), "cpu"), (WallClock(), "wall")):
            ex = _executor(llama_dir, name)
            per_step, per_request, steps = measure_host(ex, clock, 512, 100, num_requests=8)
            assert steps >= 10  # a step per output token at least, less the trimmed ones
            # Scheduling and the update of a few requests: more than nothing, far less than a step.
            assert 0 < per_step + 8 * per_request < 0.05 and per_request >= 0
    finally:
        torch.set_num_threads(threads)


def test_merge_profiles_averages_step_times_and_rechooses_the_model() -> None:
    import pytest

    from quanta.profiling import GridAxes, grid_batches, merge_profiles
    from quanta.sim.calibrate import Profile
    from quanta.sim.step_grid import StepGrid, batch_shape
    from test_cost_model import GPU, MODEL

    axes = GridAxes(prefill=(0, 16, 64), decodes=(0, 1, 4), context=(16, 256), prefill_context=(0, 128))
    batches = grid_batches(axes)

    def truth(b: list[tuple[int, int]]) -> float:
        p, d, c, q = batch_shape(b)
        return 1e-3 + 2e-5 * (p + d) + 3e-8 * d * c + 4e-9 * p * q

    def profile(scale: float, host: float) -> Profile:
        points = [{"batch": [list(x) for x in b], "num_sampled": len(b), "seconds": scale * truth(b)} for b in batches.values()]
        prof = Profile("toy", GPU.bf16_flops, GPU.mem_bandwidth, GPU.mem_bytes, 2, MODEL, points)
        times = {k: scale * truth(b) for k, b in batches.items()}
        grid = StepGrid.from_measurements(
            list(axes.prefill), list(axes.decodes), list(axes.context), list(axes.prefill_context), times, (host, 1e-6)
        )
        prof.step_grid = grid.to_dict()
        return prof

    merged = merge_profiles([profile(1.0, 1e-4), profile(1.2, 3e-4)])
    assert [p["seconds"] for p in merged.points] == pytest.approx([1.1 * truth(b) for b in batches.values()])
    expected = profile(1.1, 2e-4).step_grid
    assert merged.step_grid is not None and expected is not None
    np.testing.assert_allclose(merged.step_grid["seconds"], expected["seconds"], rtol=1e-12)
    np.testing.assert_allclose(merged.step_grid["extra"], expected["extra"], rtol=1e-12, atol=1e-18)
    assert merged.step_grid["host_seconds"] == pytest.approx(2e-4) and merged.step_grid["host_per_request"] == pytest.approx(1e-6)
    assert merged.step_model in ("roofline", "grid") and merged.grid() in (None, StepGrid.from_dict(merged.step_grid))
    other = profile(1.0, 1e-4)
    other.points = other.points[1:]
    with pytest.raises(ValueError, match="same steps"):
        merge_profiles([profile(1.0, 1e-4), other])


def test_merge_profiles_with_samples_takes_their_median_and_rebuilds_the_grid() -> None:
    """A burst of other load that slowed one sample of every step in one part moves no merged step time:
    the median of all parts' samples is taken (a mean of the parts' medians of 2 moved each by 1/4)."""
    import pytest

    from quanta.profiling import GridAxes, _grid_of, grid_batches, merge_profiles
    from quanta.sim.calibrate import Profile
    from quanta.sim.step_grid import batch_shape
    from test_cost_model import GPU, MODEL

    axes = GridAxes(prefill=(0, 16, 64), decodes=(0, 1, 4), context=(16, 256), prefill_context=(0, 128))
    batches = list(grid_batches(axes).values())

    def truth(b: list[tuple[int, int]]) -> float:
        p, d, c, q = batch_shape(b)
        return 1e-3 + 2e-5 * (p + d) + 3e-8 * d * c + 4e-9 * p * q

    def profile(factors: tuple[float, float]) -> Profile:
        points = [
            {
                "batch": [list(x) for x in b],
                "num_sampled": len(b),
                "seconds": float(np.median([f * truth(b) for f in factors])),
                "samples": [f * truth(b) for f in factors],
            }
            for b in batches
        ]
        prof = Profile("toy", GPU.bf16_flops, GPU.mem_bandwidth, GPU.mem_bytes, 2, MODEL, points)
        prof.step_grid = _grid_of(points, axes, (1e-4, 1e-6)).to_dict()
        return prof

    merged = merge_profiles([profile((1.0, 1.5)), profile((0.98, 1.02))])  # the 1.5: a burst
    # Median of (0.98, 1.0, 1.02, 1.5): 1.01 of the truth (the mean of the parts' medians: 1.125).
    assert [p["seconds"] for p in merged.points] == pytest.approx([1.01 * truth(b) for b in batches])
    assert merged.step_grid is not None
    expected = _grid_of(merged.points, axes, (1e-4, 1e-6)).to_dict()
    np.testing.assert_allclose(merged.step_grid["seconds"], expected["seconds"], rtol=1e-12)
    g = merged.step_grid
    assert g["seconds"][1][0][0] == pytest.approx(1.01 * truth([(0, 16)]))
    bad = profile((1.0, 1.0))
    bad.points = bad.points[:-1] + [{**bad.points[-1], "batch": [[0, 3]]}]
    with pytest.raises(ValueError, match="step grid"):
        _grid_of(bad.points, axes, (0.0, 0.0))
