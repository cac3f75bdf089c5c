"""Calibration: the fit recovers known efficiencies, and a real CPU profile round-trips into the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_cli
from quanta.sim.calibrate import Profile, fit
from quanta.sim.cost_model import CostModel, Efficiency
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


def test_cpu_profile_round_trip(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    run = run_cli("profile", "--model", str(llama_dir), "--repeats", "1", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "mean |error|" in run.stdout
    prof = Profile.load(out)
    assert len(prof.points) >= 10 and all(p["seconds"] > 0 for p in prof.points)
    assert prof.model.hidden_size == 64 and prof.device_peak_flops > 0
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
