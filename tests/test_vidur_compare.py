"""The Vidur side-by-side of benchmarks/sim_speed.py: trace conversion, the attention profile written
from quanta's cost model, Vidur's command line, and the labelled fallback when Vidur cannot run.

A real Vidur run (minutes: it trains its predictors first) runs only when QUANTA_VIDUR_SRC and
QUANTA_VIDUR_PYTHON name its source tree and an interpreter with its requirements."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import pytest

from quanta.sim.cost_model import CostModel
from quanta.sim.hardware import get_gpu
from quanta.sim.model_presets import get_model
from quanta.sim.workload import read_trace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import vidur_compare
import vidur_runner


def _trace(tmp_path: Path) -> Path:
    path = tmp_path / "t.csv"
    path.write_text("arrival,prompt_len,output_len\n0.5,100,7\n0.0,2000,1\n1.25,9000,300\n")
    return path


def test_trace_is_written_in_vidur_columns_and_reads_back_the_same(tmp_path: Path) -> None:
    src = _trace(tmp_path)
    out = tmp_path / "vidur.csv"
    assert vidur_compare.write_vidur_trace(str(src), out) == 3
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["arrived_at", "num_prefill_tokens", "num_decode_tokens"]
    # Sorted by arrival, as quanta replays it; quanta reads Vidur's columns back to the same requests.
    assert [float(r["arrived_at"]) for r in rows] == [0.0, 0.5, 1.25]
    back = [(r.arrival, r.prompt_len, r.output_len) for r in read_trace(out)]
    assert back == [(r.arrival, r.prompt_len, r.output_len) for r in read_trace(src)]


def test_attention_profile_matches_quanta_cost_model_and_vidur_filters(tmp_path: Path) -> None:
    out = tmp_path / "attention.csv"
    n = vidur_compare.write_attention_profile(out, "llama-2-70b", "a100-80gb", 2, 16, 16384, 128)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n > 1000
    # The columns Vidur filters on carry Llama-2-70B's shape and the cluster's TP and block size.
    assert {
        (r["n_embd"], r["n_q_head"], r["n_kv_head"], r["block_size"], r["num_tensor_parallel_workers"])
        for r in rows
    } == {("8192", "64", "8", "16", "2")}
    decode = {
        (int(r["batch_size"]), int(r["kv_cache_size"])): float(r["time_stats.attn_decode.median"])
        for r in rows
        if r["is_prefill"] == "False"
    }
    prefill = {
        (int(r["prefill_chunk_size"]), int(r["kv_cache_size"])): float(r["time_stats.attn_prefill.median"])
        for r in rows
        if r["is_prefill"] == "True"
    }
    assert all(int(r["batch_size"]) == 1 for r in rows if r["is_prefill"] == "True")
    assert max(kv for _, kv in decode) == 16384 and max(b for b, _ in decode) == 128
    # Longer contexts, bigger batches and bigger chunks cost more.
    assert decode[(8, 4032)] > decode[(8, 960)] and decode[(64, 960)] > decode[(8, 960)]
    assert prefill[(512, 4096)] > prefill[(512, 0)] and prefill[(512, 0)] > prefill[(128, 0)]
    # Per layer, in milliseconds: quanta's attention roofline for the same plan over the layers.
    cm = CostModel(get_model("llama-2-70b"), get_gpu("a100-80gb"), tp=2)
    flops, nbytes = cm.step_work([(960, 1)] * 8, 0)["attention"]
    expect = max(
        flops / (cm.gpu.bf16_flops * cm.eff.attention), nbytes / (cm.gpu.mem_bandwidth * cm.eff.memory)
    )
    assert decode[(8, 960)] == pytest.approx(expect / 80 * 1e3)


def test_usable_profile_rejects_absent_files_and_lfs_pointers(tmp_path: Path) -> None:
    cols = ("batch_size", "kv_cache_size")
    assert not vidur_compare.usable_profile(tmp_path / "none.csv", cols)
    pointer = tmp_path / "lfs.csv"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert not vidur_compare.usable_profile(pointer, cols)
    real = tmp_path / "real.csv"
    real.write_text("batch_size,kv_cache_size,x\n1,2,3\n")
    assert vidur_compare.usable_profile(real, cols)


def test_without_vidur_the_result_says_why_and_carries_the_recorded_rate(tmp_path: Path) -> None:
    res = vidur_compare.run_vidur(None, None, str(_trace(tmp_path)))
    assert not res["ok"] and "--vidur-python" in res["error"]
    assert res["recorded"]["requests_per_wall_second"] == [93.0, 125.0]
    assert "not measured" in res["recorded"]["note"]
    res = vidur_compare.run_vidur(sys.executable, str(tmp_path), str(_trace(tmp_path)))
    assert not res["ok"] and "not Vidur's source tree" in res["error"] and "recorded" in res


def test_a_failing_vidur_run_is_reported_with_its_reason(tmp_path: Path) -> None:
    # A tree that looks like Vidur's but whose package cannot import: the runner's reason comes back.
    (tmp_path / "vidur").mkdir()
    (tmp_path / "vidur" / "simulator.py").write_text("raise ImportError('no vidur here')\n")
    res = vidur_compare.run_vidur(
        sys.executable, str(tmp_path), str(_trace(tmp_path)), replicas=1, timeout=120
    )
    assert not res["ok"] and "no vidur here" in res["error"]
    assert res["runs"]["first"]["ok"] is False and "cached" not in res["runs"]
    assert res["recorded"] == vidur_compare.RECORDED


def test_vidur_command_line_sets_the_cluster_trace_and_lean_outputs(tmp_path: Path) -> None:
    a = argparse.Namespace(
        vidur_src=tmp_path, trace=tmp_path / "t.csv", replicas=16, model="meta-llama/Llama-2-70b-hf", device="a100",
        network_device="a100_pairwise_nvlink", tp=2, global_scheduler="lor", chunk_size=512, batch_size_cap=128,
        block_size=16, max_tokens=16384, attention_csv=tmp_path / "a.csv", rf_grid="small", lean=True,
        cache_dir=tmp_path / "c",
    )  # fmt: skip
    args = vidur_runner.vidur_args(a, tmp_path / "out")
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--cluster_config_num_replicas"] == "16"
    assert flags["--replica_scheduler_config_type"] == "sarathi"
    assert flags["--sarathi_scheduler_config_chunk_size"] == "512"
    assert flags["--request_generator_config_type"] == "trace_replay"
    assert flags["--trace_request_generator_config_max_tokens"] == "16384"
    assert flags["--global_scheduler_config_type"] == "lor"
    rf = "--random_forrest_execution_time_predictor_config"
    assert flags[f"{rf}_attention_input_file"] == str(tmp_path / "a.csv")
    assert flags[f"{rf}_num_estimators"] == "250"
    for off in ("store_plots", "enable_chrome_trace", "store_batch_metrics", "store_utilization_metrics"):
        assert f"--no-metrics_config_{off}" in args
    a.lean, a.rf_grid = False, "full"
    args = vidur_runner.vidur_args(a, tmp_path / "out")
    assert "--no-metrics_config_store_plots" not in args and f"{rf}_num_estimators" not in args


@pytest.mark.skipif(
    not (os.environ.get("QUANTA_VIDUR_SRC") and os.environ.get("QUANTA_VIDUR_PYTHON")),
    reason="QUANTA_VIDUR_SRC / QUANTA_VIDUR_PYTHON not set (Vidur's source tree and interpreter)",
)
def test_real_vidur_runs_the_trace_and_reuses_its_predictor_cache(tmp_path: Path) -> None:
    rows = "".join(f"{i * 0.5},{200 + 37 * i},{5 + i % 9}\n" for i in range(40))
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + rows)
    res = vidur_compare.run_vidur(
        os.environ["QUANTA_VIDUR_PYTHON"],
        os.environ["QUANTA_VIDUR_SRC"],
        str(trace),
        replicas=1,
        rf_grid="small",
    )
    assert res["ok"], res.get("error")
    first, cached = res["runs"]["first"], res["runs"]["cached"]
    assert first["cached_predictors_before"] == 0 and cached["cached_predictors_before"] > 0
    # Training's worker processes are reaped after the setup, so their CPU time counts in the first run.
    assert first["children_cpu_seconds"] > 0
    assert first["startup_plus_run_cpu_seconds"] > first["setup_cpu_seconds"] + first["run_cpu_seconds"]
    # The same simulation on the cached predictors: every request, the same latencies.
    assert first["num_requests_with_metrics"] == cached["num_requests_with_metrics"] == 40
    assert first["e2e_p50"] == cached["e2e_p50"] > 0
    # As its users run it (default outputs): the same simulation, and the output writing timed.
    default = res["runs"]["default"]
    assert default["ok"], default.get("error")
    assert default["e2e_p50"] == cached["e2e_p50"] and default["output_wall_seconds"] > 0
    assert default["with_output_requests_per_wall_second"] < default["requests_per_wall_second"]
