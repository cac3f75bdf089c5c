"""Workload generators' statistics and the trace file format (tests make their own data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quanta.sim.workload import (
    LengthDist,
    WorkloadRequest,
    gamma_arrivals,
    poisson_arrivals,
    preset,
    read_trace,
    scale_rate,
    to_requests,
    write_trace,
)


def test_arrival_processes_have_the_asked_rate_and_burstiness() -> None:
    rng = np.random.default_rng(0)
    t = poisson_arrivals(4.0, 40_000, rng)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    bursty = np.diff(gamma_arrivals(4.0, 3.0, 40_000, rng))
    assert bursty.mean() == pytest.approx(0.25, rel=0.08)
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError):
        gamma_arrivals(0.0, 1.0, 3, rng)


def test_length_distributions() -> None:
    rng = np.random.default_rng(1)
    x = LengthDist("lognormal", 1730, 5696).sample(rng, 50_000)
    assert np.median(x) == pytest.approx(1730, rel=0.03)
    assert np.percentile(x, 90) == pytest.approx(5696, rel=0.05)
    u = LengthDist("uniform", 32, 256).sample(rng, 10_000)
    assert u.min() >= 32 and u.max() <= 256 and u.mean() == pytest.approx(144, rel=0.03)
    z = LengthDist("zipf", 1.2, 0, low=1, high=1000).sample(rng, 20_000)
    assert z.min() >= 1 and z.max() <= 1000 and (z == 1).mean() > (z == 2).mean() > (z == 10).mean()
    with pytest.raises(ValueError, match="unknown length distribution"):
        LengthDist("pareto", 1, 2).sample(rng, 1)


def test_presets_match_published_medians() -> None:
    w = preset("sharegpt", 40_000, rate=2.0, seed=3, max_total=8192)
    prompts = np.array([r.prompt_len for r in w])
    outputs = np.array([r.output_len for r in w])
    assert np.median(prompts) == pytest.approx(1730, rel=0.05)
    assert np.median(outputs) == pytest.approx(415, rel=0.05)
    assert all(r.prompt_len + r.output_len <= 8192 for r in w)
    assert w[-1].arrival / len(w) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="unknown workload preset"):
        preset("nope", 1, 1.0)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_trace_round_trip_and_errors(tmp_path: Path, suffix: str) -> None:
    reqs = [
        WorkloadRequest(0.0, 10, 5, tenant="a", priority=1, deadline=2.0, session_id="s1"),
        WorkloadRequest(0.5, 20, 7),
    ]
    path = tmp_path / f"t{suffix}"
    write_trace(path, reqs)
    assert read_trace(path) == reqs
    # Public-trace column names, no arrivals: drawn at the given rate.
    bare = tmp_path / "bare.csv"
    bare.write_text("num_prefill_tokens,num_decode_tokens\n100,20\n200,30\n300,40\n")
    with pytest.raises(ValueError, match="no arrival times"):
        read_trace(bare)
    drawn = read_trace(bare, rate=10.0)
    assert [r.prompt_len for r in drawn] == [100, 200, 300] and drawn[0].arrival == 0.0
    broken = tmp_path / "broken.csv"
    broken.write_text("prompt_len,output_len\n10,x\n")
    with pytest.raises(ValueError, match=r"broken\.csv:2"):
        read_trace(broken)
    with pytest.raises(ValueError, match="does not exist"):
        read_trace(tmp_path / "missing.csv")


def test_engine_requests_from_a_workload() -> None:
    w = [WorkloadRequest(1.0, 40, 9, tenant="t", deadline=3.0), WorkloadRequest(2.0, 40, 4)]
    reqs = to_requests(scale_rate(w, 2.0))
    assert [r.arrival_time for r in reqs] == [0.5, 1.0]
    assert reqs[0].deadline == pytest.approx(3.5) and reqs[0].tenant == "t"
    assert reqs[0].sampling_params.max_tokens == 9 and reqs[0].sampling_params.ignore_eos
    assert reqs[0].prompt_token_ids[0] != reqs[1].prompt_token_ids[0]  # no accidental prefix sharing
