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
With --vidur-src and --vidur-python, Microsoft Vidur from its source tree on the azure16 workload
(same trace and cluster: sarathi with 512-token chunks, least-outstanding-requests router), a first run
that trains its predictors, a second on their cache with its heavy outputs off, a third on the cache with
its default outputs (as its users run it), and quanta's rate over Vidur's in each (wall and CPU);
when Vidur cannot run, why, and its recorded rate, labelled recorded (benchmarks/vidur_compare.py).
Prints a table and writes JSON.

    python benchmarks/sim_speed.py [--rounds 2] [--large 1000000] [--large-baseline] [--before-src DIR]
                                   [--vidur-src DIR --vidur-python PY [--vidur-rf-grid small] [--vidur-outputs-off-only]]
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

import vidur_compare  # benchmarks/, beside this file

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


def vidur_ratio(groups: dict[str, list[dict]], vidur: dict) -> dict:
    """quanta's requests per second over Vidur's on the same workload (azure16, quanta's default run):
    against Vidur with its outputs off (wall and CPU, its startup on cached predictors plus event loop,
    and its event loop alone), and against Vidur as its users run it, with its default outputs (startup
    plus event loop, and with the output writing it does at exit). Against Vidur's recorded rate,
    labelled so, when it could not run."""
    rows = [r for r in groups.get("azure16 runs", []) if "error" not in r]
    if not rows:
        return {"error": "no quanta azure16 run to compare"}
    q_wall = statistics.median(r["requests_per_wall_second"] for r in rows)
    q_cpu = statistics.median(r["requests_per_cpu_second"] for r in rows)
    out = {"quanta_req_per_wall_s": q_wall, "quanta_req_per_cpu_s": q_cpu}
    cached = vidur.get("runs", {}).get("cached", {})
    if vidur.get("ok") and cached.get("ok"):
        out.update(
            measured=True,
            vidur_req_per_wall_s=cached["requests_per_wall_second"],
            vidur_req_per_cpu_s=cached["requests_per_cpu_second"],
            wall_ratio=q_wall / cached["requests_per_wall_second"],
            cpu_ratio=q_cpu / cached["requests_per_cpu_second"],
            wall_ratio_vs_event_loop=q_wall / cached["run_requests_per_wall_second"],
            cpu_ratio_vs_event_loop=q_cpu / cached["run_requests_per_cpu_second"],
        )
        default = vidur["runs"].get("default", {})
        if default.get("ok"):
            out.update(
                vidur_default_req_per_wall_s=default["requests_per_wall_second"],
                default_wall_ratio=q_wall / default["requests_per_wall_second"],
                default_cpu_ratio=q_cpu / default["requests_per_cpu_second"],
                default_wall_ratio_with_output=q_wall / default["with_output_requests_per_wall_second"],
            )
    else:
        low, high = vidur_compare.RECORDED["requests_per_wall_second"]
        out.update(
            measured=False,
            recorded=vidur_compare.RECORDED,
            wall_ratio_vs_recorded=[q_wall / high, q_wall / low],
        )
    return out


def print_vidur(vidur: dict, ratio: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    if not vidur.get("ok"):
        print(f"vidur: could not run: {vidur.get('error')}")
    elif vidur.get("error"):
        print(f"vidur: an extra run failed: {vidur['error'].strip()[:200]}")
    table = Table(title="Vidur, same trace and cluster (sarathi 512, lor router, Llama-2-70B TP2 A100)")
    for col in ("run", "setup s", "event loop s", "output s", "req/s", "req/CPU-s", "loop req/s", "req/s +output"):
        table.add_column(col, justify="right")
    for col in ("TTFT p50 s", "E2E p50 s"):
        table.add_column(col, justify="right")
    for name, r in vidur.get("runs", {}).items():
        if not r.get("ok"):
            table.add_row(name, "", "", "", "error", str(r.get("error"))[:60])
            continue
        table.add_row(
            name,
            f"{r['setup_wall_seconds']:.1f}",
            f"{r['run_wall_seconds']:.1f}",
            f"{r['output_wall_seconds']:.1f}",
            f"{r['requests_per_wall_second']:.0f}",
            f"{r['requests_per_cpu_second']:.0f}",
            f"{r['run_requests_per_wall_second']:.0f}",
            f"{r['with_output_requests_per_wall_second']:.0f}",
            f"{r.get('ttft_p50', float('nan')):.2f}",
            f"{r.get('e2e_p50', float('nan')):.2f}",
        )
    Console().print(table)
    if "attention_profile" in vidur:
        print(f"vidur attention profile: {vidur['attention_profile']}")
    if ratio.get("measured"):
        if "default_wall_ratio" in ratio:
            print(
                f"quanta / Vidur as its users run it (measured, cached predictors, default outputs): "
                f"{ratio['default_wall_ratio']:.1f}x per wall second, {ratio['default_cpu_ratio']:.1f}x per "
                f"CPU second; {ratio['default_wall_ratio_with_output']:.1f}x with its output writing"
            )
        print(
            f"quanta / Vidur with its outputs off (measured, cached predictors): {ratio['wall_ratio']:.1f}x "
            f"per wall second, {ratio['cpu_ratio']:.1f}x per CPU second; against Vidur's event loop alone "
            f"{ratio['wall_ratio_vs_event_loop']:.1f}x / {ratio['cpu_ratio_vs_event_loop']:.1f}x"
        )
    elif "wall_ratio_vs_recorded" in ratio:
        lo, hi = ratio["wall_ratio_vs_recorded"]
        note = ratio["recorded"]["note"]
        print(f"quanta / Vidur (RECORDED rate, not measured: {note}): {lo:.1f}-{hi:.1f}x")


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
    ap.add_argument("--vidur-python", default=None, help="interpreter with Vidur's requirements")
    ap.add_argument("--vidur-src", default=None, help="Vidur's source tree: run it on the azure16 workload")
    ap.add_argument(
        "--vidur-rf-grid", default="full", choices=["full", "small"], help="Vidur's random-forest grid"
    )
    ap.add_argument("--vidur-cache", default=None, help="Vidur's predictor cache (default: a fresh one)")
    ap.add_argument(
        "--vidur-outputs-off-only", action="store_true", help="skip Vidur's run with its default outputs"
    )
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
    vidur = vs_vidur = None
    if args.vidur_python or args.vidur_src:
        vidur = vidur_compare.run_vidur(
            args.vidur_python,
            args.vidur_src,
            args.trace,
            replicas=16,
            rf_grid=args.vidur_rf_grid,
            cache_dir=args.vidur_cache,
            default_outputs=not args.vidur_outputs_off_only,
        )
        vs_vidur = vidur_ratio(groups, vidur)

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
    result = {"summary": summary, "runs": groups}
    if vidur is not None:
        print_vidur(vidur, vs_vidur)
        result.update(vidur=vidur, vidur_ratio=vs_vidur)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
