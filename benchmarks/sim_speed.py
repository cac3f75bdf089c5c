"""Simulator speed: simulated requests per wall-clock second, with no start-up training.

Workloads: 10,000 chat requests (`sharegpt` preset, or ../shared/traces/sharegpt_chat.csv lengths with
--trace) on 1 replica, and 100,000 on 16 replicas; Llama-3.1-8B on H100, sarathi. Optionally the same
1-replica workload in Vidur (`--vidur-python`, see benchmarks/vidur_runner.py) for a ratio in the same run.
Prints a table and writes JSON.

    python benchmarks/sim_speed.py [--trace ../shared/traces/sharegpt_chat.csv] [--vidur-python PY]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from quanta.sim.hardware import get_gpu
from quanta.sim.model_presets import get_model
from quanta.sim.simulation import SimConfig, simulate
from quanta.sim.workload import WorkloadRequest, gamma_arrivals, preset, read_trace

HERE = Path(__file__).resolve().parent


def workload(n: int, qps: float, trace: str | None, seed: int = 0) -> list[WorkloadRequest]:
    if trace:
        rows = read_trace(trace, rate=qps, seed=seed)
        reps = -(-n // len(rows))
        base = (rows * reps)[:n]
        arrivals = gamma_arrivals(qps, 1.0, n, np.random.default_rng(seed))
        return [
            WorkloadRequest(float(a), min(r.prompt_len, 8000), r.output_len) for a, r in zip(arrivals, base)
        ]
    return preset("sharegpt", n, qps, seed=seed, max_total=8192)


def run_quanta(n: int, replicas: int, qps: float, trace: str | None) -> dict:
    w = workload(n, qps, trace)
    cfg = SimConfig(get_model("llama-3.1-8b"), get_gpu("h100"), policy="sarathi", replicas=replicas)
    started = time.perf_counter()
    res = simulate(w, cfg)
    wall = time.perf_counter() - started
    assert all(r.finished for r in res.requests)
    return {
        "engine": "quanta",
        "num_requests": n,
        "replicas": replicas,
        "qps": qps,
        "wall_seconds": wall,
        "steps": res.num_steps,
        "requests_per_wall_second": n / wall,
    }


def run_vidur(python: str, n: int, qps: float, out_dir: Path) -> dict:
    out = out_dir / "vidur.json"
    cmd = [
        python,
        str(HERE / "vidur_runner.py"),
        "--num-requests",
        str(n),
        "--qps",
        str(qps),
        "--replicas",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    res = json.loads(out.read_text()) if out.is_file() else {}
    if proc.returncode != 0 or not res.get("ok", False):
        why = res.get("notes") or (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"engine": "vidur", "error": str(why)}
    res["engine"] = "vidur"
    res["requests_per_wall_second"] = res["num_requests"] / res["wall_seconds"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="simulated requests per wall-clock second")
    ap.add_argument(
        "--trace", default=None, help="CSV trace for the request lengths (default: sharegpt preset)"
    )
    ap.add_argument("--qps", type=float, default=4.0, help="request rate per replica")
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--large-replicas", type=int, default=16)
    ap.add_argument("--vidur-python", default=None)
    ap.add_argument("--out", default="results/sim_speed.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [run_quanta(args.small, 1, args.qps, args.trace)]
    if args.vidur_python:
        rows.append(run_vidur(args.vidur_python, args.small, args.qps, out.parent))
    rows.append(run_quanta(args.large, args.large_replicas, args.qps * args.large_replicas, args.trace))

    from rich.console import Console
    from rich.table import Table

    table = Table(title="simulator speed (Llama-3.1-8B, H100, sarathi)")
    for col in ("engine", "requests", "replicas", "wall s", "simulated req / wall s", "quanta ×"):
        table.add_column(col, justify="right")
    base = rows[0]
    for r in rows:
        if "error" in r:
            table.add_row(r["engine"], "", "", "", "error", str(r["error"])[:60])
            continue
        ratio = (
            base["requests_per_wall_second"] / r["requests_per_wall_second"]
            if r["engine"] == "vidur"
            else 1.0
        )
        table.add_row(
            r["engine"],
            str(r["num_requests"]),
            str(r["replicas"]),
            f"{r['wall_seconds']:.1f}",
            f"{r['requests_per_wall_second']:.0f}",
            f"{ratio:.1f}",
        )
    Console().print(table)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
