"""The step grid's monotone smoothing (unbiased by noise) and its host-time term."""

from __future__ import annotations

import numpy as np
import pytest

from quanta.profiling import GridAxes, grid_batches
from quanta.sim.cost_model import CostModel
from quanta.sim.step_grid import GridStepTime, StepGrid, _monotone, batch_shape
from test_cost_model import GPU, MODEL

AXES = GridAxes(
    prefill=(0, 16, 64, 256), decodes=(0, 1, 2, 4, 8, 16), context=(16, 256, 1024), prefill_context=(0, 128, 512)
)


def _truth(batch: list[tuple[int, int]]) -> float:
    p, d, c, q = batch_shape(batch)
    return 1e-3 + 2e-5 * (p + d) + 3e-8 * d * c + 1e-8 * p * p + 4e-9 * p * q


def _grid(noise: float, seed: int, host: tuple[float, float] = (0.0, 0.0)) -> GridStepTime:
    rng = np.random.default_rng(seed)
    times = {k: _truth(b) * (1 + noise * rng.standard_normal()) for k, b in grid_batches(AXES).items()}
    grid = StepGrid.from_measurements(
        list(AXES.prefill), list(AXES.decodes), list(AXES.context), list(AXES.prefill_context), times, host
    )
    return GridStepTime(grid, CostModel(MODEL, GPU))


def _is_monotone(t: np.ndarray) -> bool:
    return all((np.diff(t, axis=k) >= -1e-15).all() for k in range(t.ndim))


def test_monotone_keeps_monotone_tables_and_orders_noisy_ones() -> None:
    rng = np.random.default_rng(0)
    exact = np.add.outer(np.add.outer(np.arange(5.0), 2 * np.arange(4.0)), np.arange(3.0) ** 2)
    np.testing.assert_array_equal(_monotone(exact), exact)
    noisy = exact * (1 + 0.3 * rng.standard_normal(exact.shape))
    smooth = _monotone(noisy)
    assert not _is_monotone(noisy) and _is_monotone(smooth)
    # Between the table's lower and upper monotone envelopes.
    lower = np.flip(np.minimum.accumulate(np.flip(noisy, 0), 0), 0)
    lower = np.flip(np.minimum.accumulate(np.flip(lower, 1), 1), 1)
    lower = np.flip(np.minimum.accumulate(np.flip(lower, 2), 2), 2)
    upper = np.maximum.accumulate(np.maximum.accumulate(np.maximum.accumulate(noisy, 0), 1), 2)
    assert (lower <= smooth + 1e-12).all() and (smooth <= upper + 1e-12).all()


def test_noisy_measurements_do_not_bias_the_grid_low() -> None:
    """Symmetric noise on the measured points: the grid's steps are, on average, as long as the truth
    (a lower envelope alone made them systematically short)."""
    batches = [b for b in grid_batches(AXES).values()] + [[(300, 1)] * 6, [(500, 1)] * 3 + [(0, 100)]]
    errors = []
    for seed in range(20):
        model = _grid(0.1, seed)
        errors += [model.batch_time(b) / _truth(b) - 1 for b in batches]
    assert abs(np.mean(errors)) < 0.01 and abs(np.median(errors)) < 0.01


def test_host_time_is_added_per_step_and_per_request() -> None:
    plain, hosted = _grid(0.0, 0), _grid(0.0, 0, host=(3e-4, 2e-5))
    for batch in ([(100, 1)] * 5, [(0, 64)], [(300, 1)] * 3 + [(0, 200)], [(0, 16), (0, 16)]):
        assert hosted.batch_time(batch) == pytest.approx(plain.batch_time(batch) + 3e-4 + 2e-5 * len(batch))


def test_decode_runs_with_host_time_match_plan_times_to_the_bit() -> None:
    model = _grid(0.1, 4, host=(3e-4, 2e-5))
    context = np.array([5 * 16 + 3 * k for k in range(60)], dtype=np.int64)
    for total, t in zip(context.tolist(), model.decode_times(5, context).tolist()):
        batch = [(total // 5 + (i < total % 5), 1) for i in range(5)]
        assert model.batch_time(batch) == t


def test_grid_round_trips_with_host_time_and_reads_older_grids() -> None:
    grid = _grid(0.05, 2, host=(3e-4, 2e-5)).grid
    assert StepGrid.from_dict(grid.to_dict()) == grid
    old = grid.to_dict()
    del old["host_seconds"], old["host_per_request"]  # a profile written before the host term
    assert StepGrid.from_dict(old).host_seconds == 0.0


def test_several_prefill_chunks_cost_their_own_attention_pairs() -> None:
    """G is measured with one chunk of P tokens, whose causal triangle is P^2 / 2 pairs; two chunks of
    P / 2 attend to half that. A step time linear in the pairs is priced exactly for any mix of chunks
    on grid points (a Q below 0 runs along H's first segment), where pricing only the cached context
    made two-chunk steps of 512 tokens about 20% slow on a CPU (sim_fidelity, Intel Xeon)."""

    def truth(batch: list[tuple[int, int]]) -> float:
        pairs = sum(n * c + n * n / 2 for c, n in batch if not (n == 1 and c > 0))
        tokens = sum(n for _, n in batch)
        return 1e-3 + 2e-5 * tokens + 4e-9 * pairs

    axes = GridAxes(prefill=(0, 128, 256), decodes=(0, 1, 2), context=(16, 256), prefill_context=(0, 128, 512))
    times = {k: truth(b) for k, b in grid_batches(axes).items()}
    grid = StepGrid.from_measurements(
        list(axes.prefill), list(axes.decodes), list(axes.context), list(axes.prefill_context), times
    )
    model = GridStepTime(grid, CostModel(MODEL, GPU))
    for batch in ([(0, 128), (0, 128)], [(0, 256)], [(128, 128), (0, 128)], [(300, 64), (0, 64), (0, 128)]):
        assert batch_shape(batch)[0] == 256
        assert model.batch_time(batch) == pytest.approx(truth(batch), rel=1e-9)
    assert batch_shape([(0, 128), (0, 128)])[3] == -64.0  # a quarter of the pairs of one chunk of 256
    assert model.batch_time([(0, 128), (0, 128)]) < model.batch_time([(0, 256)])


def test_chunk_times_match_plan_times_to_the_bit() -> None:
    """chunk_time (a step of decodes and one prompt chunk, priced from its totals) is batch_time of that
    batch, a one-token chunk after cached tokens (which reads as a decode) included."""
    model = _grid(0.1, 5, host=(3e-4, 2e-5))
    rng = np.random.default_rng(0)
    for _ in range(300):
        contexts = [int(c) for c in rng.integers(1, 2000, size=int(rng.choice([0, 1, 3, 20])))]
        cached, new = int(rng.integers(0, 1500)), int(rng.choice([1, 2, int(rng.integers(1, 400))]))
        batch = [(c, 1) for c in contexts] + [(cached, new)]
        sample = bool(rng.integers(0, 2))
        assert model.chunk_time(len(contexts), sum(contexts), cached, new, sample) == model.batch_time(batch)
