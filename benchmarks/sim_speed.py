"""Simulator speed: simulated requests per wall-clock second, and peak memory, at cluster scale.

Workloads (Llama-2-70B, TP2, A100-80GB, sarathi, least-load router):
  azure16  the whole Azure LLM inference 2023 conversation trace (../shared/traces/azure_conv_2023.csv,
           its own arrivals) on 16 replicas;
  large    --large requests (default 1,000,000) on --large-replicas (64): the trace's requests repeated
           end to end and played 4x faster, so each replica sees the load of the 16-replica run.
Each run is a fresh process (its own peak RSS). The baseline is measured in the same run: the same
simulator stepping one schedule() call per step (SimConfig.decode_runs=False), interleaved with the
default (runs of provably identical decode steps planned at once); --rounds rounds of each, best and
median reported (the machine is shared, wall-clock figures are noisy). CPU seconds are reported too.
With --before-src, an older checkout's simulator (e.g. main before this work) is a third row, interleaved.
Optionally Vidur on its own workload (`--vidur-python`, see benchmarks/vidur_runner.py).
Prints a table and writes JSON.

    python benchmarks/sim_speed.py [--rounds 2] [--large 1000000] [--large-baseline] [--before-src DIR]
                                   [--vidur-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRACE = HERE.parent.parent / "shared" / "traces" / "azure_conv_2023.csv"


def workload(trace: str, n: int | None, speedup: float) -> list:
    from quanta.sim.workload import read_trace, scale_rate

    base = read_trace(trace)
    if n is None:
        return base
    span = base[-1].arrival - base[0].arrival + (base[-1].arrival - base[0].arrival) / len(base)
    out = []
    for k in range(-(-n // len(base))):  # copies end to end: the trace's burstiness, n requests
        out.extend(replace(r, arrival=r.arrival + k * span) for r in base)
    return scale_rate(out[:n], speedup)


def worker(spec: dict) -> dict:
    """One simulation in this process: its wall and CPU time and this process's peak RSS."""
    import resource
    import time

    from quanta.sim.hardware import get_gpu
    from quanta.sim.model_presets import get_model
    from quanta.sim.simulation import SimConfig, simulate

    w = workload(spec["trace"], spec["num_requests"], spec["speedup"])
    # A context long enough for every prompt of the trace (the longest is 8.2k tokens).
    # decode_runs None: a checkout from before SimConfig had it (--before-src).
    extra = {} if spec["decode_runs"] is None else {"decode_runs": spec["decode_runs"]}
    cfg = SimConfig(
        get_model("llama-2-70b"), get_gpu("a100-80gb"), tp=2, replicas=spec["replicas"], max_model_len=16384, **extra
    )
    wall, cpu = time.perf_counter(), time.process_time()
    res = simulate(w, cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if hasattr(res, "summary"):
        s = res.summary()
    else:
        from quanta.metrics import summarize

        s = summarize(res.metrics())
    assert s.num_requests == len(w), "every request finishes"
    return {
        "num_requests": len(w),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "requests_per_wall_second": len(w) / wall,
        "requests_per_cpu_second": len(w) / cpu,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "num_steps": res.num_steps,
        "num_decode_runs": getattr(res, "num_decode_runs", 0),
        "kept_requests": bool(res.requests),
        "ttft_p50": s.ttft["p50"],
        "itl_p99": s.itl["p99"],
        "e2e_p50": s.e2e["p50"],
    }


def run(spec: dict, timeout: float) -> dict:
    env = None
    if spec.get("src"):  # another checkout's simulator (the worker reads only the trace helpers here)
        env = {**os.environ, "PYTHONPATH": spec["src"]}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        return {**spec, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def run_vidur(python: str, n: int, qps: float, out_dir: Path) -> dict:
    out = out_dir / "vidur.json"
    cmd = [python, str(HERE / "vidur_runner.py"), "--num-requests", str(n), "--qps", str(qps)]
    proc = subprocess.run([*cmd, "--replicas", "1", "--out", str(out)], capture_output=True, text=True)
    res = json.loads(out.read_text()) if out.is_file() else {}
    if proc.returncode != 0 or not res.get("ok", False):
        why = res.get("notes") or (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"name": "vidur", "error": str(why)}
    return {"name": "vidur", **res, "requests_per_wall_second": res["num_requests"] / res["wall_seconds"]}


def best_and_median(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows if key in r]
    return (max(values), statistics.median(values)) if values else (float("nan"), float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description="simulated requests per wall-clock second")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of baseline and runs")
    ap.add_argument("--large", type=int, default=1_000_000, help="requests of the large run (0: skip)")
    ap.add_argument("--large-replicas", type=int, default=64)
    ap.add_argument("--large-baseline", action="store_true", help="also the large run without decode runs")
    ap.add_argument(
        "--before-src", default=None, help="src/ of an older checkout: its simulator as a third row, interleaved"
    )
    ap.add_argument("--vidur-python", default=None)
    ap.add_argument("--out", default="results/sim_speed.json")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    small = {"trace": args.trace, "num_requests": None, "speedup": 1.0, "replicas": 16}
    variants: list[tuple[str, bool | None, str | None]] = [
        ("azure16 per-step", False, None),
        ("azure16 runs", True, None),
    ]
    if args.before_src:
        variants.insert(0, ("azure16 before", None, args.before_src))
    for _ in range(args.rounds):  # interleaved: all see the same machine load, round by round
        for name, runs, src in variants:
            spec = {**small, "name": name, "decode_runs": runs, "src": src}
            groups.setdefault(name, []).append(run(spec, 3600))
    if args.large:
        scale = args.large_replicas / 16
        large = {"trace": args.trace, "num_requests": args.large, "speedup": scale}
        todo = [("large runs", True)] + ([("large per-step", False)] if args.large_baseline else [])
        for name, runs in todo:
            spec = {**large, "name": name, "replicas": args.large_replicas, "decode_runs": runs}
            groups[name] = [run(spec, 4 * 3600)]
    if args.vidur_python:
        groups["vidur"] = [run_vidur(args.vidur_python, 10_000, 4.0, out.parent)]

    from rich.console import Console
    from rich.table import Table

    table = Table(title="simulator speed: Llama-2-70B TP2 on A100-80GB, sarathi, Azure conv 2023 trace")
    cols = ("run", "requests", "replicas", "rounds", "wall s (best)", "req/s best", "req/s median")
    for col in (*cols, "req/CPU-s best", "peak RSS GB", "× per-step"):
        table.add_column(col, justify="right")
    base = {
        "azure16": best_and_median(groups.get("azure16 per-step", []), "requests_per_wall_second")[1],
        "large": best_and_median(groups.get("large per-step", []), "requests_per_wall_second")[1],
    }
    summary = {}
    for name, rows in groups.items():
        errors = [r["error"] for r in rows if "error" in r]
        if errors:
            table.add_row(name, "", "", str(len(rows)), "", "error", str(errors[0])[:60])
            continue
        best, median = best_and_median(rows, "requests_per_wall_second")
        ratio = median / base.get(name.split()[0], float("nan"))
        summary[name] = {"best_req_per_s": best, "median_req_per_s": median, "ratio_vs_per_step": ratio}
        r0 = rows[0]
        table.add_row(
            name,
            str(r0.get("num_requests", "")),
            str(r0.get("replicas", "")),
            str(len(rows)),
            f"{min(r['wall_seconds'] for r in rows):.1f}",
            f"{best:.0f}",
            f"{median:.0f}",
            f"{max(r.get('requests_per_cpu_second', 0) for r in rows):.0f}",
            f"{max(r.get('peak_rss_gb', 0) for r in rows):.2f}",
            f"{ratio:.2f}",
        )
    Console().print(table)
    out.write_text(json.dumps({"summary": summary, "runs": groups}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
