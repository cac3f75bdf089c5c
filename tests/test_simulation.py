"""The simulator: real EngineCore replicas on virtual clocks behind a router, and `quanta simulate`."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli
from quanta.metrics import summarize
from quanta.request import RequestStatus
from quanta.sim.hardware import get_gpu
from quanta.sim.model_presets import get_model
from quanta.sim.simulation import SimConfig, simulate
from quanta.sim.workload import WorkloadRequest, preset, read_trace, write_trace


def config(**kw) -> SimConfig:
    return SimConfig(get_model("mistral-7b"), get_gpu("a100-80gb"), **kw)


def test_every_request_finishes_at_its_trace_length_and_runs_are_deterministic() -> None:
    w = preset("sharegpt", 200, rate=4.0, seed=1, max_total=8192)
    a, b = simulate(w, config()), simulate(w, config())
    assert [r.num_output_tokens for r in a.requests] == [x.output_len for x in w]
    assert all(r.finished for r in a.requests)
    assert [r.times.finished for r in a.requests] == [r.times.finished for r in b.requests]
    assert a.kv_usage[0] and all(0.0 <= u <= 1.0 for _, u in a.kv_usage[0])


def test_requests_carry_no_oracle_max_tokens_yet_stop_at_their_true_length() -> None:
    w = [WorkloadRequest(0.01 * i, 64 + i, 5 + 7 * i) for i in range(6)]
    res = simulate(w, config())
    # What a chat client without max_tokens sends: the policies cannot read the true length from it.
    assert all(r.sampling_params.max_tokens is None for r in res.requests)
    assert [r.num_output_tokens for r in res.requests] == [x.output_len for x in w]
    assert all(r.status == RequestStatus.FINISHED_STOPPED for r in res.requests)  # at EOS, as the model
    # A configured default caps the requests that set none; the shorter ones still end at EOS.
    capped = simulate(w, config(default_max_tokens=20)).requests
    assert all(r.sampling_params.max_tokens == 20 for r in capped)
    assert [r.num_output_tokens for r in capped] == [min(x.output_len, 20) for x in w]
    assert [r.status for r in capped] == [
        RequestStatus.FINISHED_STOPPED if x.output_len <= 20 else RequestStatus.FINISHED_LENGTH for x in w
    ]
    with pytest.raises(ValueError, match="default_max_tokens"):
        config(default_max_tokens=0)


def test_a_trace_max_tokens_cuts_the_output(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_trace(
        path, [WorkloadRequest(0.0, 50, 40, max_tokens=10), WorkloadRequest(0.1, 50, 8, max_tokens=10)]
    )
    w = read_trace(path)
    assert [x.max_tokens for x in w] == [10, 10]
    res = simulate(w, config())
    assert [(r.num_output_tokens, r.status) for r in res.requests] == [
        (10, RequestStatus.FINISHED_LENGTH),  # the client's limit came first: metrics see 10 tokens
        (8, RequestStatus.FINISHED_STOPPED),
    ]
    assert [m.num_output_tokens for m in res.metrics()] == [10, 8]


def test_sessions_and_prefix_groups_hit_the_prefix_cache() -> None:
    w = [
        # Turn 2 arrives long after turn 1 finished: its first 200 prompt tokens are turn 1's prompt.
        WorkloadRequest(0.0, 200, 10, session_id="chat"),
        WorkloadRequest(30.0, 300, 10, session_id="chat"),
        # A shared 128-token system prompt, then each request's own text.
        WorkloadRequest(0.0, 300, 10, prefix_group="sys", prefix_len=128),
        WorkloadRequest(10.0, 250, 10, prefix_group="sys", prefix_len=128),
        WorkloadRequest(20.0, 400, 10, prefix_group="sys", prefix_len=128),
        # Unrelated requests share nothing, with each other or with the above.
        WorkloadRequest(40.0, 300, 10),
        WorkloadRequest(50.0, 300, 10),
    ]
    res = simulate(w, config(block_size=16))
    assert config().enable_prefix_caching
    cached = [r.num_cached_tokens for r in res.requests]
    # Whole blocks only: turn 1's 13th block also holds its outputs, which turn 2's prompt lacks.
    assert cached == [0, 192, 0, 128, 128, 0, 0]
    assert all(r.status == RequestStatus.FINISHED_STOPPED for r in res.requests)


def test_stall_free_batching_cuts_tail_tbt_under_load() -> None:
    w = preset("sharegpt", 300, rate=3.0, seed=2, max_total=8192)
    sarathi = summarize(simulate(w, config(policy="sarathi")).metrics())
    orca = summarize(simulate(w, config(policy="prefill-first")).metrics())
    # Prefill-first stalls decodes for whole prompts; Sarathi's steps stay within one token budget.
    assert sarathi.itl["p99"] < orca.itl["p99"] / 3


def test_replicas_and_routers() -> None:
    w = [WorkloadRequest(0.01 * i, 100, 20) for i in range(40)]
    rr = simulate(w, config(replicas=4, router="round-robin"))
    assert rr.num_steps > 0 and all(len(u) > 0 for u in rr.kv_usage)
    one = summarize(simulate(w, config(replicas=1)).metrics())
    four = summarize(simulate(w, config(replicas=4)).metrics())
    assert four.e2e["mean"] < one.e2e["mean"]


def test_cli_simulate(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    write_trace(
        trace, [WorkloadRequest(0.05 * i, 300 + i, 30, tenant="a" if i % 2 else "b") for i in range(30)]
    )
    # The same simulation in-process gives each request's TTFT: an SLO at their median splits them, so
    # goodput must count exactly the requests that meet it.
    same = simulate(
        read_trace(trace), SimConfig(get_model("llama-3.1-8b"), get_gpu("h100"), default_max_tokens=20)
    )
    ttfts = sorted(r.times.first_token - r.arrival_time for r in same.requests)
    slo = ttfts[len(ttfts) // 2]
    num_good = sum(t <= slo for t in ttfts)
    assert 0 < num_good < 30
    out = tmp_path / "r.json"
    proc = run_cli(
        "simulate",
        "--model",
        "llama-3.1-8b",
        "--gpu",
        "h100",
        "--trace",
        str(trace),
        "--policy",
        "sarathi,prefill-first",
        "--ttft-slo",
        repr(slo),
        "--default-max-tokens",
        "20",  # below the trace's 30 output tokens: every request is cut to 20
        "--json",
        str(out),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["sarathi", "prefill-first"] and rows[0]["num_requests"] == 30
    assert set(rows[0]["per_tenant"]) == {"a", "b"} and rows[0]["per_tenant"]["a"]["num_requests"] == 15
    assert rows[0]["goodput"] * rows[0]["duration"] == pytest.approx(num_good)
    assert rows[0]["output_throughput"] * rows[0]["duration"] == pytest.approx(30 * 20)
    bad = run_cli("simulate", "--trace", "sharegpt", timeout=120)
    assert bad.returncode == 2 and "--qps" in bad.stderr


def test_capacity_search_brackets_the_answer() -> None:
    from quanta.sim.capacity import find_capacity

    base = preset("sharegpt", 150, rate=1.0, seed=4, max_total=8192)
    sarathi = find_capacity(base, config(policy="sarathi"), tbt_slo=0.1, tolerance=0.05)
    orca = find_capacity(base, config(policy="prefill-first"), tbt_slo=0.1, tolerance=0.05)
    for res in (sarathi, orca):
        assert res.qps > 0
        assert all(e.qps <= res.qps for e in res.evaluations if e.ok)
        failed_above = [e.qps for e in res.evaluations if not e.ok and e.qps > res.qps]
        assert failed_above and min(failed_above) <= res.qps * 1.05 + 1e-9
    assert sarathi.qps > 1.5 * orca.qps  # stall-free batching sustains more load within a strict TBT SLO


def test_plots_are_written(tmp_path: Path) -> None:
    from quanta.sim.capacity import find_capacity
    from quanta.sim.plots import plot_capacity_sweep, plot_kv_usage, plot_latency_cdfs

    w = preset("sharegpt", 60, rate=2.0, seed=5, max_total=8192)
    results = {p: simulate(w, config(policy=p)) for p in ("sarathi", "prefill-first")}
    cap = find_capacity(
        preset("sharegpt", 60, rate=1.0, seed=5, max_total=8192), config(), tbt_slo=0.1, tolerance=0.2
    )
    for path in (
        plot_latency_cdfs(results, tmp_path / "cdf.png"),
        plot_kv_usage(results, tmp_path / "kv.png"),
        plot_capacity_sweep([cap], 0.1, tmp_path / "cap.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_simulate_replays_a_whole_trace_by_default(tmp_path: Path) -> None:
    # More requests than the old default of 1000, which used to cut traces silently.
    trace = tmp_path / "t.csv"
    write_trace(trace, [WorkloadRequest(0.01 * i, 20 + i % 50, 2 + i % 5) for i in range(1200)])
    args = ("simulate", "--model", "llama-3.1-8b", "--gpu", "h100", "--trace", str(trace))
    out = tmp_path / "r.json"
    proc = run_cli(*args, "--json", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())[0]
    assert row["num_requests"] == 1200
    assert "1200 requests, arrivals over 12.0 s" in proc.stdout and "s of simulated time" in proc.stdout
    assert row["simulated_seconds"] >= 11.99
    # A time window: the requests arriving in the first 3 s (300 of them).
    proc = run_cli(*args, "--duration", "3", "--json", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())[0]["num_requests"] == 300


def test_head_cuts_by_count_and_time_window() -> None:
    from quanta.sim.workload import head

    w = [WorkloadRequest(float(t), 10, 2) for t in (5, 1, 3, 2, 4)]
    assert [r.arrival for r in head(w)] == [1, 2, 3, 4, 5]
    assert [r.arrival for r in head(w, duration=2.5)] == [1, 2, 3]
    assert [r.arrival for r in head(w, num_requests=2, duration=2.5)] == [1, 2]
    with pytest.raises(ValueError, match="duration"):
        head(w, duration=0)


def test_prompts_past_the_context_are_refused_with_the_fix() -> None:
    w = [WorkloadRequest(0.0, 100, 4), WorkloadRequest(1.0, 5000, 4), WorkloadRequest(2.0, 4096, 4)]
    with pytest.raises(
        ValueError, match=r"2 requests .*\(4096\) tokens or more \(the longest: 5000\).*max_model_len"
    ):
        simulate(w, config(max_model_len=4096))


def test_large_runs_stream_metrics_instead_of_keeping_requests() -> None:
    w = preset("sharegpt", 120, rate=3.0, seed=6, max_total=8192)
    kept = simulate(w, config(replicas=2))
    streamed = simulate(w, config(replicas=2, keep_requests=False))
    assert len(kept.requests) == 120 and streamed.requests == []
    with pytest.raises(ValueError, match="keep_requests"):
        streamed.metrics()
    # Below MAX_EXACT_ITL values everything is exact: the same summary as from the kept requests (means
    # to rounding: the stream adds requests as they finish, not in workload order).
    a, b = streamed.summary(ttft_slo=1.0).as_dict(), summarize(kept.metrics(), ttft_slo=1.0).as_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value == (pytest.approx(b[key], rel=1e-12) if isinstance(value, dict | float) else b[key])
    assert streamed.stream.itl_exact and streamed.num_requests == 120
    assert streamed.peak_kv_usage == kept.peak_kv_usage > 0


def test_a_run_puts_the_garbage_collector_back_as_it_found_it() -> None:
    w = preset("sharegpt", 20, rate=3.0, seed=2, max_total=4096)
    assert gc.isenabled()
    simulate(w, config())
    assert gc.isenabled()
    gc.disable()
    try:
        simulate(w, config())
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ValueError):  # and when the run fails
        simulate([WorkloadRequest(0.0, 10**6, 1)], config())
    assert gc.isenabled()


def test_time_between_tokens_in_a_histogram_stays_within_one_percent() -> None:
    from quanta.metrics import MetricsStream, RequestMetrics

    rng = np.random.default_rng(0)
    exact, sketched = MetricsStream(), MetricsStream(max_exact_itl=1000)
    for i in range(400):
        itl = list(rng.lognormal(np.log(0.03), 0.6, size=int(rng.integers(2, 60))))
        m = RequestMetrics(f"r{i}", "t", float(i), 10, len(itl) + 1, 0.1, 1.0, 0.03, 0.0, itl)
        exact.add(m)
        sketched.add(m)
    a, b = exact.summary().itl, sketched.summary().itl
    assert exact.itl_exact and not sketched.itl_exact
    assert b["mean"] == pytest.approx(a["mean"], rel=1e-12)
    for p in ("p50", "p90", "p99"):
        assert b[p] == pytest.approx(a[p], rel=0.011)
    xs, cdf = sketched.itl_cdf()
    assert cdf[-1] == pytest.approx(1.0) and np.all(np.diff(xs) > 0)


def test_kv_usage_trace_is_bounded_and_keeps_the_exact_peak() -> None:
    from quanta.sim.simulation import UsageTrace

    trace = UsageTrace(cap=100)
    for i in range(10_000):
        trace.record(float(i), 1.0 if i == 7777 else 0.5 + 0.4 * np.sin(i / 50))  # a one-step spike
    assert len(trace.points) <= 100 and trace.peak == 1.0
    assert 1.0 not in [u for _, u in trace.points]  # thinned out of the outline, not out of the peak
    ts = [t for t, _ in trace.points]
    assert ts == sorted(ts) and ts[0] == 0.0 and ts[-1] > 9000


def test_a_trace_starting_before_zero_waits_no_longer_than_one_starting_at_zero() -> None:
    w = [WorkloadRequest(float(t), 64, 8) for t in (0, 1, 2)]
    shifted = [WorkloadRequest(r.arrival - 100, r.prompt_len, r.output_len) for r in w]
    a, b = simulate(w, config()).summary(), simulate(shifted, config()).summary()
    assert b.ttft["p50"] == pytest.approx(a.ttft["p50"]) and b.e2e["p99"] == pytest.approx(a.e2e["p99"])
    with pytest.raises(ValueError, match="finite arrival"):
        simulate([WorkloadRequest(float("nan"), 64, 8)], config())
    for empty in (WorkloadRequest(0.0, 64, 0), WorkloadRequest(0.0, 0, 8)):
        with pytest.raises(ValueError, match="prompt_len and output_len of at least 1"):
            simulate([empty], config())


def test_prefill_saved_without_per_request_data() -> None:
    # Two requests sharing a 64-token prefix: the second is served 64 tokens from the cache.
    w = [WorkloadRequest(float(i), 96, 4, prefix_group="g", prefix_len=64) for i in range(2)]
    kept, streamed = simulate(w, config()), simulate(w, config(keep_requests=False))
    assert not streamed.requests
    assert streamed.prefill_tokens_saved == kept.prefill_tokens_saved == 64
    assert streamed.prefill_saved_fraction == pytest.approx(64 / 192)


def test_capacity_of_a_trace_with_its_own_arrivals_is_in_requests_per_second() -> None:
    from quanta.sim.capacity import at_unit_rate, find_capacity

    w = [WorkloadRequest(100.0 + 0.2 * i, 64, 8) for i in range(11)]  # 5 req/s, from t=100
    unit = at_unit_rate(w)
    assert (len(unit) - 1) / (unit[-1].arrival - unit[0].arrival) == pytest.approx(1.0)
    # A handful of requests drains at any rate: the search says the capacity is only a lower bound.
    res = find_capacity(unit, config(), tbt_slo=1.0)
    assert res.at_search_limit and res.qps >= 1000
    with pytest.raises(ValueError, match="must be positive"):
        find_capacity(unit, config(), tbt_slo=0.0)


@pytest.mark.parametrize("decode_runs", [False, True])
def test_a_swap_in_that_copies_nothing_runs_on_and_no_request_runs_before_it_arrives(decode_runs: bool) -> None:
    """w1 is swapped out holding one full block, which stays in the device's prefix cache: its swap-in
    copies nothing and takes no time. That empty, zero-time step admitted it, so the replica steps on
    (it slept as if blocked by a migration: w1 stalled, or ran with w2 at w0's end, before w2 arrived)."""
    w = [WorkloadRequest(0.5, 80, 6), WorkloadRequest(0.5, 14, 7), WorkloadRequest(0.7, 1, 1)]
    cfg = config(
        max_model_len=100,
        num_kv_blocks=7,
        preemption_mode="swap",
        swap_space_gb=0.02,
        check_integrity=True,
        decode_runs=decode_runs,
    )
    res = simulate(w, cfg)
    assert res.swap_stats["swap_ins"] == 1 and res.swap_stats["swapped_blocks"] == 1  # the swap-out only
    assert [r.num_output_tokens for r in res.requests] == [6, 7, 1]
    _, w1, w2 = res.requests
    assert w1.times.tokens[3] < w2.times.arrival  # w1 went on right after the swap-in
    assert all(r.times.arrival <= r.times.first_scheduled for r in res.requests)
    assert simulate(w[:2], cfg).requests[1].finished  # alone, it stalled


def test_settings_that_are_not_values_are_errors() -> None:
    from quanta.sim.workload import gamma_arrivals, head

    nan, inf = float("nan"), float("inf")
    rng = np.random.default_rng(0)
    for rate, cv in ((nan, 1.0), (1.0, nan), (1.0, inf), (inf, 1.0)):
        with pytest.raises(ValueError, match="positive, finite"):
            gamma_arrivals(rate, cv, 4, rng)
    with pytest.raises(ValueError, match="duration must be positive"):
        head([WorkloadRequest(0.0, 8, 2)], duration=nan)
    for interval in (nan, inf, 0.0):
        with pytest.raises(ValueError, match="poll_interval"):
            config(poll_interval=interval)
    with pytest.raises(ValueError, match="swap_space_gb"):
        config(swap_space_gb=-1.0)
    w = [WorkloadRequest(0.0, 8, 2)]
    with pytest.raises(ValueError, match="JSON object"):
        simulate(w, config(policy="priority", policy_args=[1, 2]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad policy settings"):
        simulate(w, config(policy="deadline", policy_args={"slo_classes": 5}))
    with pytest.warns(UserWarning, match=r"does not use the settings \['aging'\]"):  # a typo for aging_s
        simulate(w, config(policy="priority", policy_args={"aging": 30}))
    for name in ("max_num_seqs", "num_kv_blocks", "max_num_batched_tokens"):
        with pytest.raises(ValueError, match=name):
            config(**{name: 0})


def test_cli_report_json_has_no_nan_and_bad_output_folder_fails_first(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    # One output token each: no time between tokens, so its percentiles are undefined (null in JSON).
    write_trace(trace, [WorkloadRequest(0.1 * i, 32, 1) for i in range(5)])
    out = tmp_path / "r.json"
    args = ("simulate", "--model", "llama-3.1-8b", "--gpu", "h100", "--trace", str(trace))
    proc = run_cli(*args, "--json", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))[0]
    assert row["itl"]["p99"] is None and row["num_requests"] == 5
    proc = run_cli(*args, "--json", str(tmp_path / "missing" / "r.json"), timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
