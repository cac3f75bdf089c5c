"""Calibration: the fit recovers known efficiencies, and a real CPU profile round-trips into the simulator."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli
from quanta.profiling import GridAxes, grid_batches
from quanta.sim.calibrate import Profile, fit
from quanta.sim.cost_model import CostModel, Efficiency
from quanta.sim.simulation import SimConfig, simulate
from quanta.sim.step_grid import GridStepTime, StepGrid, batch_shape
from quanta.sim.workload import LengthDist, synthetic
from test_cost_model import GPU, MODEL


def test_fit_recovers_known_efficiencies() -> None:
    truth = Efficiency(
        matmul=0.6, attention=0.35, memory=0.75, step_overhead=1.5e-3, link=1.0, allreduce_latency=0.0
    )
    cm = CostModel(MODEL, GPU, efficiency=truth)
    batches = [[(0, n)] for n in (64, 256, 1024, 2048)] + [
        [(c, 1)] * b for b in (1, 8, 64) for c in (128, 2048)
    ]
    batches += [[(4000, 1)] * 256, [(0, 3000)], [(512, 1)] * 16 + [(0, 512)]]
    points = [
        {"batch": [list(x) for x in b], "num_sampled": len(b), "seconds": cm.step_cost(b, len(b)).total}
        for b in batches
    ]
    prof = Profile("toy", GPU.bf16_flops, GPU.mem_bandwidth, GPU.mem_bytes, 2, MODEL, points)
    got = fit(prof)
    assert got.efficiency.matmul == pytest.approx(0.6, rel=0.02)
    assert got.efficiency.attention == pytest.approx(0.35, rel=0.05)
    assert got.efficiency.memory == pytest.approx(0.75, rel=0.02)
    assert got.efficiency.step_overhead == pytest.approx(1.5e-3, rel=0.05)
    assert got.max_abs_rel_error < 0.01


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"device_mem_bandwidth": 0}, "device_mem_bandwidth must be a positive number"),
        ({"device_peak_flops": float("nan")}, "device_peak_flops must be a positive number"),
        ({"points": [{"batch": 5, "num_sampled": 1, "seconds": 0.1}]}, "point 0: batch must be"),
        ({"points": [{"batch": [[0, 8]], "num_sampled": 1, "seconds": -0.1}]}, "point 0: seconds must be"),
        ({"step_grid": {"prefill": [0, 8], "decodes": [0, 1], "context": [1, 2], "prefill_context": [0, 1],
                        "seconds": [[[0.0, 0.0], [0.0, 0.0]]] * 2, "extra": [[0.0, 0.0]] * 2}},
         "some positive"),
    ],
)  # fmt: skip
def test_profiles_with_figures_that_cannot_be_measured_are_refused(tmp_path: Path, change: dict, match: str) -> None:
    points = [{"batch": [[0, n]], "num_sampled": 1, "seconds": 1e-3 * n} for n in (8, 16, 32, 64)]
    good = Profile("toy", GPU.bf16_flops, GPU.mem_bandwidth, GPU.mem_bytes, 2, MODEL, points)
    good.save(tmp_path / "good.json")
    assert Profile.load(tmp_path / "good.json").points == points
    dataclasses.replace(good, **change).save(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=match):
        Profile.load(tmp_path / "bad.json")


def test_cpu_profile_round_trip(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    # The CLI without the step grid (its default grid takes minutes here); the grid path is below.
    run = run_cli("profile", "--model", str(llama_dir), "--repeats", "1", "--no-grid", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "mean |error|" in run.stdout
    prof = Profile.load(out)
    assert len(prof.points) >= 10 and all(p["seconds"] > 0 for p in prof.points)
    assert prof.model.hidden_size == 64 and prof.device_peak_flops > 0
    assert prof.step_grid is None and prof.step_model == "roofline"
    result = fit(prof)
    assert result.efficiency.matmul > 0 and result.mean_abs_rel_error == result.mean_abs_rel_error  # finite
    sim = run_cli(
        "simulate",
        "--profile",
        str(out),
        "--trace",
        "sharegpt",
        "--qps",
        "2",
        "--num-requests",
        "20",
        "--max-model-len",
        "1024",
    )
    assert sim.returncode == 0, sim.stderr
    with pytest.raises(ValueError, match="cannot read profile"):
        Profile.load(llama_dir / "config.json")


def test_cpu_profile_with_a_small_step_grid_drives_simulate(llama_dir: Path, tmp_path: Path) -> None:
    from quanta.profiling import run_profile

    axes = GridAxes(prefill=(0, 16, 64), decodes=(0, 1, 4), context=(16, 128), prefill_context=(0, 64))
    prof = run_profile(llama_dir, repeats=1, step_grid=axes)
    assert prof.step_grid is not None and prof.step_model in ("roofline", "grid")
    prof.step_model = "grid"  # whatever the fit: the simulator must run on the measured grid
    out = tmp_path / "grid-profile.json"
    prof.save(out)
    assert Profile.load(out).grid() is not None
    sim = run_cli(
        "simulate", "--profile", str(out), "--trace", "sharegpt", "--qps", "2", "--num-requests", "20",
        "--max-model-len", "1024",
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr


def test_profile_measures_an_engine_executor_given_to_it(llama_dir: Path) -> None:
    """sim_fidelity profiles the real run's own load of the model: the engine's executor, used in place."""
    from quanta import LLM, SamplingParams
    from quanta.profiling import run_profile

    axes = GridAxes(prefill=(0, 16), decodes=(0, 1, 2), context=(16, 64), prefill_context=(0, 32))
    llm = LLM(str(llama_dir), max_model_len=256, num_kv_blocks=64)
    executor = llm.engine.core.executor
    prof = run_profile(llama_dir, repeats=1, grid=[[(0, 8)], [(8, 1)]], step_grid=axes, executor=executor)
    assert prof.step_grid is not None and len(prof.points) == 2 + len(grid_batches(axes))
    assert llm.engine.core.executor is executor
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3  # the engine still serves
    small = LLM(str(llama_dir), max_model_len=256, num_kv_blocks=16).engine.core.executor
    with pytest.raises(ValueError, match=r"at least \d+ of them"):
        run_profile(llama_dir, repeats=1, step_grid=axes, executor=small)


# ---- the profile-driven step-time model (quanta.sim.step_grid) ------------------------------------------
AXES = GridAxes(
    prefill=(0, 16, 64, 256), decodes=(0, 1, 4, 16), context=(16, 256, 1024), prefill_context=(0, 128, 512)
)


def _truth(batch: list[tuple[int, int]]) -> float:
    """A made-up monotone step time: fixed cost, per token, per decode context token, per prefill pair."""
    p, d, c, q = batch_shape(batch)
    return 1e-3 + 2e-5 * (p + d) + 3e-8 * d * c + 1e-8 * p * p + 4e-9 * p * q


def _nondecreasing(times: list[float]) -> bool:
    return all(b >= a * (1 - 1e-12) for a, b in itertools.pairwise(times))  # rounding where flat


def _grid(noise: float = 0.0, seed: int = 0) -> GridStepTime:
    rng = np.random.default_rng(seed)
    batches = grid_batches(AXES)
    times = {k: _truth(b) * (1 + noise * rng.standard_normal()) for k, b in batches.items()}
    grid = StepGrid.from_measurements(
        list(AXES.prefill), list(AXES.decodes), list(AXES.context), list(AXES.prefill_context), times
    )
    return GridStepTime(grid, CostModel(MODEL, GPU))


def test_grid_model_reproduces_its_measured_points() -> None:
    model = _grid()
    for batch in grid_batches(AXES).values():
        assert model.batch_time(batch) == pytest.approx(_truth(batch), rel=1e-12)
    # Linear in the decodes' context, bilinear in a chunk's tokens and context: exact between points too.
    assert model.batch_time([(600, 1)] * 4) == pytest.approx(_truth([(600, 1)] * 4), rel=1e-12)
    assert model.batch_time([(300, 64)]) == pytest.approx(_truth([(300, 64)]), rel=1e-12)


@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_grid_model_interpolates_monotonically(noise: float) -> None:
    """More prefill tokens, more decodes, longer contexts: never a shorter step, even from noisy
    measurements, and in between or past the measured points."""
    model = _grid(noise, seed=3)
    for d in range(0, 40, 3):
        for c in (1, 40, 300, 900, 1500, 3000):
            times = [model.batch_time([(c, 1)] * d + ([(0, p)] if p else [])) for p in range(0, 600, 7)]
            times = times[1:] if d == 0 else times  # (0, 0): no step
            assert _nondecreasing(times)
        for p in (0, 10, 100, 400):
            times = [
                model.batch_time([(c, 1)] * max(d, 1) + ([(0, p)] if p else [])) for c in range(1, 3000, 50)
            ]
            assert _nondecreasing(times)
    for p in (5, 16, 100, 300):
        times = [model.batch_time([(q, p)]) for q in range(0, 800, 25)]
        assert _nondecreasing(times)
    # Between two measured points a step costs what lies between them.
    lo, hi = model.batch_time([(256, 1)] * 4), model.batch_time([(256, 1)] * 16)
    assert _nondecreasing([lo, model.batch_time([(256, 1)] * 9), hi])


def test_grid_decode_times_match_plan_times_to_the_bit() -> None:
    model = _grid(0.1, seed=1)
    context = np.array([7 * 16 + 5 * k for k in range(50)], dtype=np.int64)
    runs = model.decode_times(7, context)
    for total, t in zip(context.tolist(), runs.tolist()):
        batch = [(total // 7 + (i < total % 7), 1) for i in range(7)]
        assert model.batch_time(batch) == t


def test_profile_with_a_step_grid_round_trips_and_drives_the_simulator(tmp_path: Path) -> None:
    model = _grid()
    points = [
        {"batch": [list(x) for x in b], "num_sampled": len(b), "seconds": _truth(b)}
        for b in grid_batches(AXES).values()
    ]
    prof = Profile("toy", GPU.bf16_flops, GPU.mem_bandwidth, GPU.mem_bytes, 2, MODEL, points)
    assert prof.grid() is None  # the roofline unless the profile chose the grid
    prof.step_model, prof.step_grid = "grid", model.grid.to_dict()
    prof.save(tmp_path / "p.json")
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded.grid() == model.grid
    workload = synthetic(30, LengthDist("uniform", 20, 300), LengthDist("uniform", 5, 40), rate=50.0, seed=2)
    cfg = SimConfig(MODEL, GPU, max_model_len=1024, num_kv_blocks=512, step_grid=loaded.grid())
    res = simulate(workload, cfg)
    assert res.num_requests == 30 and all(r.finished for r in res.requests)
    stepwise = simulate(workload, dataclasses.replace(cfg, decode_runs=False))
    assert [r.times.tokens for r in res.requests] == [r.times.tokens for r in stepwise.requests]
    with pytest.raises(ValueError, match="tensor parallelism"):
        SimConfig(MODEL, GPU, tp=2, step_grid=loaded.grid())
    (tmp_path / "bad.json").write_text(
        (tmp_path / "p.json").read_text().replace('"step_model": "grid"', '"step_model": "lookup"')
    )
    with pytest.raises(ValueError, match="unknown step_model"):
        Profile.load(tmp_path / "bad.json")
