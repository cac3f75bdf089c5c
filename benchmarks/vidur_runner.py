"""Time one Microsoft Vidur simulation, from Vidur's source tree, in this process (Vidur's interpreter).

Run with the interpreter of an environment that has Vidur's requirements (pandas, scikit-learn, wandb,
ddsketch, plotly, fasteners, ...), not quanta's: this file imports only Vidur and the standard library.
Vidur is imported from --vidur-src (its git checkout), so its own profiling CSVs under data/ are used;
the PyPI build is not (it fetches its data from a hub when it starts, which fails offline).

    /opt/vidur-venv/bin/python benchmarks/vidur_runner.py --vidur-src /opt/vidur-src \
        --trace trace.csv --replicas 16 --cache-dir cache --out-dir out --out result.json

The run is split into phases, each timed (wall and this process's CPU seconds):
  setup   Simulator(config): Vidur's cluster, whose execution-time predictor trains its random forests
          and predicts its lookup tables (or loads both from --cache-dir when an earlier run left them
          there), and the trace read into requests;
  run     Simulator.run(): the event loop, the simulation proper;
  output  Simulator._write_output(): metrics files (and plots and a Chrome trace unless --lean).
Request metrics (TTFT = Vidur's prefill_e2e_time, E2E, scheduling delay) are read back from the
request_metrics.csv Vidur writes, for a sanity check against quanta on the same workload.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Vidur's own random-forest grid (RandomForrestExecutionTimePredictorConfig's defaults), and the one
# grid point --rf-grid small keeps. The simulation looks its times up in tables predicted once from the
# best forest, so the grid changes the training time and the table's values, not the cost of a lookup.
RF_GRIDS = {
    "full": None,
    "small": {"num_estimators": [250], "max_depth": [16], "min_samples_split": [2]},
}


def vidur_commit(src: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def vidur_args(a: argparse.Namespace, out_dir: Path) -> list[str]:
    """Vidur's command line (its flat-dataclass flags) for the trace, cluster and predictor."""
    rf = "random_forrest_execution_time_predictor_config"
    args = [
        "--seed", "42",
        "--log_level", "warning",
        "--cluster_config_num_replicas", str(a.replicas),
        "--replica_config_model_name", a.model,
        "--replica_config_device", a.device,
        "--replica_config_network_device", a.network_device,
        "--replica_config_tensor_parallel_size", str(a.tp),
        "--replica_config_num_pipeline_stages", "1",
        "--global_scheduler_config_type", a.global_scheduler,
        "--replica_scheduler_config_type", "sarathi",
        "--sarathi_scheduler_config_chunk_size", str(a.chunk_size),
        "--sarathi_scheduler_config_batch_size_cap", str(a.batch_size_cap),
        "--sarathi_scheduler_config_block_size", str(a.block_size),
        "--request_generator_config_type", "trace_replay",
        "--trace_request_generator_config_trace_file", str(a.trace),
        # Vidur cuts prompts so that prompt + output <= max_tokens; quanta's context is 16k: no cut.
        "--trace_request_generator_config_max_tokens", str(a.max_tokens),
        "--execution_time_predictor_config_type", "random_forrest",
        # Lookup tables must cover every context the trace reaches; a prefill chunk is <= chunk_size.
        f"--{rf}_prediction_max_tokens_per_request", str(a.max_tokens),
        f"--{rf}_prediction_max_prefill_chunk_size", str(a.chunk_size),
        f"--{rf}_prediction_max_batch_size", str(a.batch_size_cap),
        f"--{rf}_compute_input_file", str(a.vidur_src / "data/profiling/compute/{DEVICE}/{MODEL}/mlp.csv"),
        f"--{rf}_all_reduce_input_file", str(a.vidur_src / "data/profiling/network/{NETWORK_DEVICE}/all_reduce.csv"),
        f"--{rf}_send_recv_input_file", str(a.vidur_src / "data/profiling/network/{NETWORK_DEVICE}/send_recv.csv"),
        "--metrics_config_output_dir", str(out_dir),
        "--metrics_config_cache_dir", str(a.cache_dir),
        # Per-batch and utilization series: off when lean (quanta keeps per-request metrics only).
        f"--{'no-' if a.lean else ''}metrics_config_store_batch_metrics",
        f"--{'no-' if a.lean else ''}metrics_config_store_utilization_metrics",
    ]  # fmt: skip
    attention = a.attention_csv or a.vidur_src / "data/profiling/compute/{DEVICE}/{MODEL}/attention.csv"
    args += [f"--{rf}_attention_input_file", str(attention)]
    if a.lean:  # the heavy outputs off: the timing is the simulation
        args += ["--no-metrics_config_store_plots", "--no-metrics_config_enable_chrome_trace"]
    grid = RF_GRIDS[a.rf_grid]
    for key, values in (grid or {}).items():
        args += [f"--{rf}_{key}", *map(str, values)]
    return args


def phase(fn: Callable[[], T]) -> tuple[T, float, float]:
    """fn's value, wall seconds and this process's CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def reap_workers() -> None:
    """Shut down joblib's reusable worker processes (Vidur's predictor training fans out to them): they
    stay alive for reuse, and their CPU time counts in RUSAGE_CHILDREN only once they exit."""
    try:
        from joblib.externals.loky import reusable_executor
    except ImportError:
        return
    executor = getattr(reusable_executor, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True)


def request_metrics(out_dir: Path) -> dict:
    """Medians and p99s of Vidur's request metrics (seconds), from the request_metrics.csv it wrote."""
    files = sorted(out_dir.rglob("request_metrics.csv"))
    if not files:
        return {}
    cols = {
        "ttft": "prefill_e2e_time",
        "e2e": "request_e2e_time",
        "scheduling_delay": "request_scheduling_delay",
    }
    values: dict[str, list[float]] = {k: [] for k in cols}
    n = 0
    with files[-1].open(newline="") as f:
        for row in csv.DictReader(f):
            n += 1
            for key, col in cols.items():
                if row.get(col):
                    values[key].append(float(row[col]))
    out: dict = {"num_requests_with_metrics": n}
    for key, vs in values.items():
        if vs:
            vs.sort()
            out[f"{key}_p50"] = statistics.median(vs)
            out[f"{key}_p99"] = vs[min(len(vs) - 1, int(0.99 * len(vs)))]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vidur-src", type=Path, required=True, help="Vidur's source tree (a git checkout)")
    p.add_argument(
        "--trace", type=Path, required=True, help="CSV: arrived_at,num_prefill_tokens,num_decode_tokens"
    )
    p.add_argument("--replicas", type=int, default=16)
    p.add_argument("--model", default="meta-llama/Llama-2-70b-hf")
    p.add_argument("--device", default="a100")
    p.add_argument("--network-device", default="a100_pairwise_nvlink")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--global-scheduler", default="lor", choices=["lor", "round_robin", "random"])
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--batch-size-cap", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--attention-csv", type=Path, default=None, help="attention profile (default: the tree's)")
    p.add_argument("--rf-grid", choices=sorted(RF_GRIDS), default="full")
    p.add_argument("--lean", action="store_true", help="no plots, Chrome trace, batch or utilization metrics")
    p.add_argument(
        "--cache-dir", type=Path, required=True, help="Vidur's predictor cache (reused across runs)"
    )
    p.add_argument("--out-dir", type=Path, required=True, help="Vidur's metrics output folder")
    p.add_argument("--out", type=Path, required=True, help="JSON result")
    a = p.parse_args()
    a.vidur_src, a.cache_dir, a.out_dir = a.vidur_src.resolve(), a.cache_dir.resolve(), a.out_dir.resolve()
    a.trace, a.out = a.trace.resolve(), a.out.resolve()  # Vidur runs in its own tree (chdir below)
    if a.attention_csv is not None:
        a.attention_csv = a.attention_csv.resolve()
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    cached_before = sorted(f.name for f in a.cache_dir.glob("*.pkl"))
    with a.trace.open(newline="") as f:
        num_requests = sum(1 for _ in csv.DictReader(f))
    result: dict = {
        "vidur_commit": vidur_commit(a.vidur_src),
        "config": {k: str(v) for k, v in vars(a).items() if k not in ("out",)},
        "cached_predictors_before": len(cached_before),
    }
    try:
        sys.path.insert(0, str(a.vidur_src))
        os.chdir(a.vidur_src)  # Vidur's defaults name data/ relative to its tree
        (_, import_wall, import_cpu) = phase(lambda: __import__("vidur.simulator"))
        from vidur.config import SimulationConfig
        from vidur.simulator import Simulator
        from vidur.utils.random import set_seeds

        sys.argv = ["vidur", *vidur_args(a, a.out_dir)]
        config = SimulationConfig.create_from_cli_args()
        set_seeds(config.seed)
        sim, setup_wall, setup_cpu = phase(lambda: Simulator(config))
        reap_workers()
        atexit.unregister(sim._write_output)  # written (and timed) below instead
        _, run_wall, run_cpu = phase(sim.run)
        _, out_wall, out_cpu = phase(sim._write_output)
    except Exception as e:  # any failure: its reason goes into the JSON for the caller to report
        result.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        sys.exit(1)
    metrics = request_metrics(a.out_dir)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.update(
        ok=True,
        num_requests=num_requests,
        simulated_seconds=sim._time,
        import_wall_seconds=import_wall,
        import_cpu_seconds=import_cpu,
        setup_wall_seconds=setup_wall,
        setup_cpu_seconds=setup_cpu,
        run_wall_seconds=run_wall,
        run_cpu_seconds=run_cpu,
        output_wall_seconds=out_wall,
        output_cpu_seconds=out_cpu,
        # Training fans out to joblib worker processes (reaped after the setup: their CPU is the setup's).
        children_cpu_seconds=children.ru_utime + children.ru_stime,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        cached_predictors_after=len(list(a.cache_dir.glob("*.pkl"))),
        **metrics,
    )
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
