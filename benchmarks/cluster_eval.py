"""Cluster dispatch and live migration (issue 10), in the simulator and on the CPU engine.

Simulator: 16 Llama-2-7B replicas on A10s (Llumnix's setting: ~18k tokens of KV each), ShareGPT lengths
(../shared/traces/sharegpt_chat.csv, read in place; total <= 4096), bursty gamma arrivals (CV 4) at high
load. Same requests for every router:
  dispatch   round-robin and least-load (baselines), freeness without migration, freeness + migration
             (Llumnix: polls every 50 ms, defrag pairing, threshold 3): P99 TTFT ratios, P99 TBT,
             preemptions and recomputed tokens (preemption loss), migrations, downtime
  downtime   migration downtime by the migrated request's length (from the migration run), against
             the median decode step
  prefix     multi-turn conversations: prefix router vs round-robin on 16 replicas, and one instance
             with the same total KV: prefix hit rate, median TTFT
CPU engine (--no-cpu to skip): two in-process EngineCores with a tiny random-weight Llama (real
ModelExecutor): downtime vs sequence length, and the source's slowdown while a migration stages.
Prints tables and writes JSON.

    python benchmarks/cluster_eval.py [--num-requests 2000] [--rate 7] [--out results/cluster_eval.json]
    python benchmarks/cluster_eval.py --serve   # plus the real Ray cluster (benchmarks/cluster_serve.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from quanta.sim.hardware import get_gpu
from quanta.sim.model_presets import get_model
from quanta.sim.program_report import print_table
from quanta.sim.simulation import SimConfig, SimResult, build_replica, simulate
from quanta.sim.workload import LengthDist, WorkloadRequest, head, read_trace

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "sharegpt_chat.csv"
MAX_LEN = 4096
A10 = get_gpu("a10")


def config(router: str, migration: bool = False, **kw) -> SimConfig:
    return SimConfig(
        get_model("llama-2-7b"),
        get_gpu("a10"),
        router=router,
        migration=migration,
        max_model_len=MAX_LEN,
        keep_requests=True,
        **kw,
    )


def table(title: str, rows: list[dict]) -> None:
    print_table(title, rows, list(rows[0]))


def row(name: str, res: SimResult) -> dict:
    s = res.summary()
    down = res.downtimes
    return {
        "router": name,
        "ttft_p50_s": s.ttft["p50"],
        "ttft_p99_s": s.ttft["p99"],
        "tbt_p99_s": s.itl["p99"],
        "preemptions": s.num_preemptions,
        "recomputed_tokens": res.recomputed_tokens,
        "migrations": res.num_migrations,
        "aborted": len(res.migrations) - res.num_migrations,
        "downtime_p50_ms": 1e3 * statistics.median(down) if down else 0.0,
        "downtime_max_ms": 1e3 * max(down) if down else 0.0,
        "wall_s": res.wall_seconds,
    }


def dispatch_eval(args: argparse.Namespace) -> tuple[list[dict], dict, SimResult]:
    w = read_trace(TRACE, rate=args.rate, cv=args.cv, seed=args.seed)
    w = head([x for x in w if x.prompt_len + x.output_len <= MAX_LEN], args.num_requests)
    runs = {
        "round-robin": config("round-robin", replicas=args.replicas),
        "least-load": config("least-load", replicas=args.replicas),
        "freeness": config("freeness", replicas=args.replicas),
        "freeness+migration": config("freeness", True, replicas=args.replicas),
    }
    results = {name: simulate(w, cfg) for name, cfg in runs.items()}
    rows = [row(name, res) for name, res in results.items()]
    table(
        f"dispatch: {args.replicas}x A10 Llama-2-7B, {len(w)} ShareGPT requests, {args.rate} req/s, gamma CV {args.cv}",
        rows,
    )
    by = {r["router"]: r for r in rows}
    mig, rr, ll, fr = by["freeness+migration"], by["round-robin"], by["least-load"], by["freeness"]
    ratios = {
        "ttft_p99_vs_round_robin": rr["ttft_p99_s"] / mig["ttft_p99_s"],
        "ttft_p99_vs_least_load": ll["ttft_p99_s"] / mig["ttft_p99_s"],
        "preemption_loss_change_vs_round_robin": mig["recomputed_tokens"] / max(rr["recomputed_tokens"], 1)
        - 1,
        "preemption_loss_change_vs_least_load": mig["recomputed_tokens"] / max(ll["recomputed_tokens"], 1)
        - 1,
        "preemption_loss_change_vs_freeness": mig["recomputed_tokens"] / max(fr["recomputed_tokens"], 1) - 1,
        "preemptions_change_vs_round_robin": mig["preemptions"] / max(rr["preemptions"], 1) - 1,
        "tbt_p99_vs_round_robin": mig["tbt_p99_s"] / rr["tbt_p99_s"],
        "tbt_p99_vs_least_load": mig["tbt_p99_s"] / ll["tbt_p99_s"],
    }
    print(
        f"freeness+migration: P99 TTFT {ratios['ttft_p99_vs_round_robin']:.1f}x better than round-robin "
        f"(target >= 5x; Llumnix paper 34.4x), {ratios['ttft_p99_vs_least_load']:.1f}x better than least-load "
        f"(target >= 2x; paper 5.5x)"
    )
    print(
        f"preemption loss (recomputed tokens) {ratios['preemption_loss_change_vs_round_robin']:+.0%} vs "
        f"round-robin, {ratios['preemption_loss_change_vs_least_load']:+.0%} vs least-load, "
        f"{ratios['preemption_loss_change_vs_freeness']:+.0%} vs freeness alone (target -70%); "
        f"P99 TBT {ratios['tbt_p99_vs_round_robin']:.2f}x round-robin's (target <= 1)"
    )
    return rows, ratios, results["freeness+migration"]


def downtime_eval(res: SimResult) -> list[dict]:
    """Downtime by the migrated request's size, against a decode step (the median time between tokens)."""
    step = res.summary().itl["p50"]
    committed = [m for m in res.migrations if m.committed and m.downtime is not None]
    rows = []
    for lo, hi in ((0, 32), (32, 64), (64, 128), (128, 256)):
        ms = [m for m in committed if lo <= m.num_blocks < hi]
        if ms:
            d = [m.downtime for m in ms]
            rows.append(
                {
                    "blocks": f"{lo * 16}-{hi * 16} tok",
                    "migrations": len(ms),
                    "downtime_p50_ms": 1e3 * statistics.median(d),
                    "downtime_max_ms": 1e3 * max(d),
                    "max_over_decode_step": max(d) / step,
                }
            )
    if rows:
        table(
            f"migration downtime by request length (simulated; median decode step {step * 1e3:.1f} ms)", rows
        )
    return rows


def multi_turn(n_conv: int, turns: int, seed: int, spread: float = 1.0) -> list[WorkloadRequest]:
    """Conversations: each turn's prompt is the previous prompt plus its answer and a new message
    (session_id), turns some seconds apart; ShareGPT-like message and answer lengths. Conversations
    start uniformly over `spread` seconds per conversation."""
    rng = np.random.default_rng(seed)
    msg = LengthDist("lognormal", 200, 800, high=1200)
    ans = LengthDist("lognormal", 250, 500, high=600)
    out = []
    for c in range(n_conv):
        t = float(rng.uniform(0, n_conv * spread))
        prompt = 0
        for _ in range(turns):
            prompt += int(msg.sample(rng, 1)[0])
            answer = int(ans.sample(rng, 1)[0])
            if prompt + answer > MAX_LEN:
                break
            out.append(WorkloadRequest(t, prompt, answer, session_id=f"c{c}"))
            prompt += answer
            t += float(rng.exponential(20.0)) + 5.0
    return sorted(out, key=lambda x: x.arrival)


def prefix_eval(args: argparse.Namespace) -> tuple[list[dict], dict]:
    w = multi_turn(args.conversations, 6, args.seed)
    rr = simulate(w, config("round-robin", replicas=args.replicas))
    pr = simulate(w, config("prefix", replicas=args.replicas))
    blocks = build_replica(rr.config).kv.num_blocks
    # One instance of the same total size: 16x the KV, compute, memory bandwidth, batch and sequences.
    n = args.replicas
    big = dataclasses.replace(
        get_gpu("a10"), bf16_flops=n * A10.bf16_flops, mem_bandwidth=n * A10.mem_bandwidth
    )
    one = simulate(
        w,
        dataclasses.replace(
            config(
                "round-robin", num_kv_blocks=blocks * n, max_num_batched_tokens=512 * n, max_num_seqs=128 * n
            ),
            gpu=big,
        ),
    )
    rows = []
    for name, res in (("round-robin", rr), ("prefix", pr), (f"1 instance, {args.replicas}x size", one)):
        s = res.summary()
        rows.append(
            {
                "router": name,
                "prefix_hit_rate": res.prefix_hit_rate,
                "ttft_p50_s": s.ttft["p50"],
                "ttft_p99_s": s.ttft["p99"],
                "preemptions": s.num_preemptions,
            }
        )
    table(f"prefix: {len(w)} turns of {args.conversations} conversations on {args.replicas} replicas", rows)
    ratios = {
        "hit_rate_gap_vs_one_instance_points": 100 * (one.prefix_hit_rate - pr.prefix_hit_rate),
        "ttft_p50_vs_round_robin": rows[1]["ttft_p50_s"] / rows[0]["ttft_p50_s"],
    }
    print(
        f"prefix router: hit rate {ratios['hit_rate_gap_vs_one_instance_points']:.1f} points below one instance "
        f"of the same total KV (target within 10); median TTFT {ratios['ttft_p50_vs_round_robin']:.2f}x "
        f"round-robin's (target <= 0.5)"
    )
    return rows, ratios


def cpu_eval() -> dict:
    """Two in-process engines with a tiny random-weight Llama on CPU: downtime vs sequence length and
    the source's slowdown while stages copy (its step times with and without a migration running)."""
    import torch

    from quanta.cluster.local import LocalCluster
    from quanta.config import CacheConfig, SchedulerConfig
    from quanta.engine.clock import WallClock
    from quanta.engine.core import EngineCore
    from quanta.executor.model_executor import ModelExecutor
    from quanta.model.make_model import make_model
    from quanta.request import Request
    from quanta.sampling_params import SamplingParams

    torch.set_num_threads(1)  # a shared machine: one thread keeps step times comparable
    folder = make_model(tempfile.mkdtemp(prefix="cluster-eval-"), "tiny-llama", seed=1)
    bs, max_len, batch = 16, 2048, 8

    def engine() -> EngineCore:
        cache = CacheConfig(block_size=bs, num_blocks=2 * batch * max_len // bs)
        return EngineCore(
            ModelExecutor(folder, cache, max_len, batch + 1, dtype="float32"),
            WallClock(),
            SchedulerConfig("sarathi", 2048, batch + 1, max_len),
            cache,
        )

    cores = [engine(), engine()]
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    def measure(length: int) -> dict:
        cl = LocalCluster(cores, router="round-robin")
        for k in range(batch):  # background decodes on the source
            cl.add_request(
                Request(f"bg{length}-{k}", [3 + (k + i) % 400 for i in range(256)], params, 0.0), 0
            )
        rid = f"m{length}"
        cl.add_request(Request(rid, [5 + i % 300 for i in range(length)], params, 0.0), 0)
        src, clock = cores[0], time.perf_counter
        for _ in range(10):
            cl.step()
        base: list[float] = []
        for _ in range(30):  # the source's steps without a migration
            t0 = clock()
            src.step()
            base.append(clock() - t0)
        m = cl.migrate(rid, 1)
        calls: list[float] = []  # the migration's source-side calls (reads between its steps)
        window = 0  # source steps while the migration ran
        while not m.finished:
            src.step()
            window += 1
            if m.phase.value in ("stage_out", "last_out"):
                t0 = clock()
                m.advance(cl.endpoints[0], cl.endpoints[1], clock)
                calls.append(clock() - t0)
            if not m.finished and m.phase.value not in ("stage_out", "last_out"):
                m.advance(cl.endpoints[0], cl.endpoints[1], clock)  # runs on the destination
            if cores[1].has_unfinished():
                cores[1].step()
        assert m.committed, m.reason
        for c in cores:
            c.abort_requests(list(c.scheduler.requests))
            while c.has_unfinished():
                c.step()
        step = statistics.median(base)
        return {
            "tokens": length,
            "stages": m.num_stages,
            "downtime_ms": 1e3 * (m.downtime or 0.0),
            "decode_step_ms": 1e3 * step,
            "downtime_over_step": (m.downtime or 0.0) / step,
            "source_calls_ms": 1e3 * sum(calls),
            # Source time spent on the migration over its step time in the window the migration ran.
            "source_slowdown": sum(calls) / (window * step),
        }

    measure(128)  # warm-up: first calls of each kernel and copy path
    rows = []
    for length in (128, 512, 1024, 1536):
        # The median of three runs by downtime: other processes on the machine disturb single runs.
        runs = sorted((measure(length) for _ in range(3)), key=lambda r: r["downtime_ms"])
        rows.append(runs[1])
    table(
        f"CPU engine: migration of one request beside {batch} decodes (tiny Llama, float32, this machine)",
        rows,
    )
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=7.0, help="arrivals per second over the 16 replicas")
    ap.add_argument("--cv", type=float, default=4.0)
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--conversations", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU engine measurements")
    ap.add_argument("--only-cpu", action="store_true", help="only the CPU engine measurements")
    ap.add_argument(
        "--serve",
        action="store_true",
        help="also the real cluster: benchmarks/cluster_serve.py (quanta serve --instances 2 on Ray vs one "
        "instance with the same KV, forced migrations, start-up)",
    )
    ap.add_argument("--out", default="results/cluster_eval.json")
    args = ap.parse_args()
    out: dict = {"args": vars(args)}
    if not args.only_cpu:
        rows, ratios, mig = dispatch_eval(args)
        out["dispatch"] = {"rows": rows, "ratios": ratios}
        out["downtime_sim"] = downtime_eval(mig)
        prows, pratios = prefix_eval(args)
        out["prefix"] = {"rows": prows, "ratios": pratios}
    if not args.no_cpu:
        out["cpu"] = cpu_eval()
    if args.serve:
        import subprocess
        import sys

        serve_json = Path(args.out).with_name("cluster_serve.json")
        script = Path(__file__).with_name("cluster_serve.py")
        subprocess.run([sys.executable, str(script), "--out", str(serve_json)], check=True)
        out["serve"] = json.loads(serve_json.read_text())
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
