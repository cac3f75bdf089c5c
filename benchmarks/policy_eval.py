"""Multi-tenant policies and swap preemption on their acceptance scenarios (issue 5).

Simulator: Llama-2-7B on an A10 (VTC's setting, ~14k tokens of KV), each scenario against FCFS (sarathi,
quanta's default, which admits in arrival order) in the same run:
  vtc       two tenants at 1.5 / 3 req/s (256 in / 256 out), 8 tenants, on-off: service gap vs the bound
  wfq       a tenant with 10x the requests: its share while both are backlogged; small requests' latency
  priority  10% high priority: their P99 TTFT, and the others' P99 TTFT and throughput
  deadline  two SLO classes: deadline attainment vs FCFS and priority
  swap      multi-turn chat with per-turn priorities: recompute vs swap, with and without block groups
Each scenario runs twice: clients that set no max_tokens (as chat clients do: the policies only have the
output-length predictor's estimate, as on the server) and clients that set max_tokens to the length they
need ("known"; the setting of the figures before non-oracle simulation).
Real engine (--real-engine): the same orderings with a tiny random-weight Llama on CPU (short runs).
Prints tables and writes JSON.

    python benchmarks/policy_eval.py [--duration 360] [--real-engine] [--out results/policy_eval.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

from quanta.metrics import RequestMetrics, summarize, summarize_by_tenant
from quanta.request import Request
from quanta.sim import scenarios
from quanta.sim.fairness import service_gap
from quanta.sim.hardware import get_gpu
from quanta.sim.model_presets import get_model
from quanta.sim.simulation import SimConfig, SimResult, build_replica, simulate
from quanta.sim.workload import WorkloadRequest

FCFS = "sarathi"


def config(policy: str, **kw) -> SimConfig:
    return SimConfig(get_model("llama-2-7b"), get_gpu("a10"), policy=policy, max_model_len=4096, **kw)


def run(wl: list[WorkloadRequest], cfg: SimConfig, known: bool) -> SimResult:
    """Simulate with clients that set max_tokens to the length they need (known) or set none, as chat
    clients do (then policies only have the output-length predictor's estimate, as on the server)."""
    if known:
        wl = [dataclasses.replace(w, max_tokens=w.output_len) for w in wl]
    return simulate(wl, cfg)


def table(title: str, rows: list[dict]) -> None:
    print(f"\n== {title}")
    cols = list(rows[0])
    fmt = [max(len(c), *(len(_f(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, fmt)))
    for r in rows:
        print("  ".join(_f(r[c]).rjust(w) for c, w in zip(cols, fmt)))


def _f(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def pairwise_gap(reqs: list[Request]) -> float:
    tenants = sorted({r.tenant for r in reqs})
    return max(service_gap(reqs, [a, b]).max_gap for a, b in itertools.combinations(tenants, 2))


def throughput(res: SimResult) -> float:
    return summarize(res.metrics()).output_throughput


# ---- simulator scenarios ---------------------------------------------------------------------------
def vtc(duration: float, known: bool) -> list[dict]:
    m_tokens = build_replica(config(FCFS)).kv.num_blocks * 16
    bound = 2 * max(1.0 * 256, 2.0 * m_tokens)
    rows = []
    cases = [
        (f"2 tenants {d:.0f}s", scenarios.two_tenants(d)) for d in (duration / 3, 2 * duration / 3, duration)
    ]
    cases += [("8 tenants", scenarios.eight_tenants(duration)), ("on-off", scenarios.on_off(duration))]
    for name, wl in cases:
        base = None
        for policy in (FCFS, "vtc"):
            res = run(wl, config(policy), known)
            gap = pairwise_gap(res.requests)
            thr = throughput(res)
            base = base or thr
            rows.append(
                {
                    "scenario": name,
                    "policy": policy,
                    "max_service_gap": gap,
                    "bound": bound,
                    "within_bound": gap <= bound,
                    "out_tok_s": thr,
                    "thr_vs_fcfs": thr / base,
                }
            )
    return rows


def wfq(duration: float, known: bool) -> list[dict]:
    rows = []
    burst = [WorkloadRequest(0.0, 256, 256, tenant="heavy") for _ in range(300)]
    burst += [WorkloadRequest(0.0, 256, 256, tenant="light") for _ in range(30)]
    mixed = scenarios.heavy_and_light(n_light=max(int(duration / 10), 10))
    for policy in (FCFS, "vtc", "wfq"):
        res = run(burst, config(policy), known)
        gap = service_gap(res.requests)
        by = summarize_by_tenant(run(mixed, config(policy), known).metrics())
        rows.append(
            {
                "policy": policy,
                "burst_heavy_share": gap.shares["heavy"],
                "weighted_share": 0.5,
                "small_reqs_mean_e2e": by["light"].e2e["mean"],
                "small_reqs_p99_e2e": by["light"].e2e["p99"],
                "heavy_mean_e2e": by["heavy"].e2e["mean"],
                "out_tok_s": by["light"].output_throughput + by["heavy"].output_throughput,
            }
        )
    return rows


def priority(duration: float, known: bool) -> list[dict]:
    rows = []
    for rate in (2.0, 2.5):
        wl = scenarios.priority_mix(duration, rate)
        for policy in (FCFS, "priority"):
            res = run(wl, config(policy), known)
            by = summarize_by_tenant(res.metrics())
            rows.append(
                {
                    "rate": rate,
                    "policy": policy,
                    "high_p99_ttft": by["high"].ttft["p99"],
                    "high_p50_ttft": by["high"].ttft["p50"],
                    "low_p99_ttft": by["low"].ttft["p99"],
                    "low_out_tok_s": by["low"].output_throughput,
                    "out_tok_s": throughput(res),
                    "preemptions": res.num_preemptions,
                }
            )
    return rows


def deadline(duration: float, known: bool) -> list[dict]:
    rows = []
    for rate in (2.5, 3.0):
        wl = scenarios.slo_mix(duration, rate)
        for policy in (FCFS, "priority", "deadline"):
            res = run(wl, config(policy, policy_args={"slo_classes": scenarios.SLO_CLASSES}), known)
            met = {c: [] for c in scenarios.SLO_CLASSES}
            for r in res.requests:
                met[r.slo_class].append(r.times.finished <= scenarios.deadline_of(r))
            n = len(res.requests)
            rows.append(
                {
                    "rate": rate,
                    "policy": policy,
                    "attainment": sum(map(sum, met.values())) / n,
                    **{f"{c}_attainment": sum(v) / len(v) for c, v in met.items()},
                    "out_tok_s": throughput(res),
                    "preemptions": res.num_preemptions,
                }
            )
    return rows


def swap(n_sessions: int, known: bool) -> list[dict]:
    wl = scenarios.multi_turn_chat(n_sessions=n_sessions, rate=0.15)
    rows = []
    for name, kw in {
        "recompute": {},
        "swap, block groups": {"preemption_mode": "swap", "swap_space_gb": 16.0},
        "swap, per block": {"preemption_mode": "swap", "swap_space_gb": 16.0, "block_groups": False},
        # Without prefix caching a recomputed victim cannot find its old blocks still on the device.
        "recompute, no prefix cache": {"enable_prefix_caching": False},
        "swap, no prefix cache": {
            "preemption_mode": "swap",
            "swap_space_gb": 16.0,
            "enable_prefix_caching": False,
        },
    }.items():
        res = run(wl, config("priority", **kw), known)
        s = summarize(res.metrics())
        st = res.swap_stats
        rows.append(
            {
                "preemption": name,
                "p99_ttft": s.ttft["p99"],
                "p50_ttft": s.ttft["p50"],
                "p99_tbt": s.itl["p99"],
                "p99.9_tbt": _pct([x for m in res.metrics() for x in m.itl], 99.9),
                "preemptions": res.num_preemptions,
                "swapped_blocks": st["swapped_blocks"],
                "copy_calls": st["copy_calls"],
                "copy_s": st["copy_seconds"],
                "out_tok_s": s.output_throughput,
            }
        )
    return rows


def _pct(xs: list[float], p: float) -> float:
    import numpy as np

    return float(np.percentile(xs, p)) if xs else float("nan")


# ---- the real engine -------------------------------------------------------------------------------
def real_engine(workdir: Path) -> list[dict]:
    """Small scenarios through LLMEngine's core on the wall clock (run_arrivals), tiny model on CPU."""
    from quanta.engine.arrivals import run_arrivals
    from quanta.engine.llm_engine import EngineArgs, LLMEngine
    from quanta.model.make_model import make_model
    from quanta.sim.workload import to_requests

    model = workdir / "tiny-llama"
    if not (model / "config.json").exists():
        make_model(model, "tiny-llama", seed=1)

    def run(policy: str, wl: list[WorkloadRequest], max_num_seqs: int, **kw) -> list[Request]:
        engine = LLMEngine(
            EngineArgs(model=str(model), policy=policy, max_model_len=512, max_num_seqs=max_num_seqs, **kw)
        )
        reqs = to_requests(wl)
        start = engine.core.clock.now()
        vocab = engine.model_config.vocab_size
        for r, w in zip(reqs, wl):
            # Greedy, for comparable outputs; a random-weight model has no notion of where to stop, so
            # its outputs are forced to the scenario's lengths (the simulator ends them at EOS instead).
            r.sampling_params = dataclasses.replace(
                r.sampling_params, temperature=0.0, max_tokens=w.output_len, ignore_eos=True
            )
            r.prompt_token_ids = [t % vocab for t in r.prompt_token_ids]
            r.all_token_ids = list(r.prompt_token_ids)
            r.arrival_time += start
            r.times.arrival = r.arrival_time
            if r.deadline is not None:
                r.deadline += start
        run_arrivals(engine.core, reqs)
        return reqs

    rows = []
    # Priority: a burst of 60 requests, 10% high priority, 4 slots.
    wl = [
        WorkloadRequest(
            0.002 * i, 64, 32, tenant="high" if i % 10 == 5 else "low", priority=0 if i % 10 == 5 else 1
        )
        for i in range(60)
    ]
    for policy in (FCFS, "priority"):
        by = summarize_by_tenant([RequestMetrics.of(r) for r in run(policy, wl, 4)])
        rows.append(
            {
                "scenario": "priority",
                "policy": policy,
                "metric": "high P99 TTFT s",
                "value": by["high"].ttft["p99"],
            }
        )
    # VTC / WFQ: tenant a sends 3x the requests of b, all at once; 2 slots.
    wl = [WorkloadRequest(0.0, 48, 24, tenant="a") for _ in range(30)] + [
        WorkloadRequest(0.0, 48, 24, tenant="b") for _ in range(10)
    ]
    for policy in (FCFS, "vtc", "wfq"):
        reqs = run(policy, wl, 2)
        rows.append(
            {
                "scenario": "fair share",
                "policy": policy,
                "metric": "share of a while both wait",
                "value": service_gap(reqs, dt=0.005).shares["a"],
            }
        )
    # Swap vs recompute: low-priority requests fill a small pool, high-priority ones arrive later.
    wl = [WorkloadRequest(0.0, 100, 60, priority=1) for _ in range(6)] + [
        WorkloadRequest(0.05, 200, 20, priority=0) for _ in range(3)
    ]
    outputs = {}
    for mode, blocks in (("no preemption", 512), ("recompute", 40), ("swap", 40)):
        reqs = run(
            "priority",
            wl,
            16,  # slots for all: only the KV pool forces preemptions
            num_kv_blocks=blocks,
            preemption_mode=mode.replace("no preemption", "recompute"),
            num_cpu_blocks=128,
            check_integrity=True,
        )
        outputs[mode] = [r.output_token_ids for r in reqs]
        n = sum(r.num_preemptions for r in reqs)
        rows.append(
            {"scenario": "preemption", "policy": f"priority/{mode}", "metric": "preemptions", "value": n}
        )
    for mode in ("swap", "recompute"):
        same = outputs[mode] == outputs["no preemption"]
        rows.append(
            {"scenario": "preemption", "policy": mode, "metric": "tokens == no preemption", "value": same}
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=360.0, help="seconds of arrivals per scenario")
    ap.add_argument("--sessions", type=int, default=100, help="conversations in the swap scenario")
    ap.add_argument("--real-engine", action="store_true", help="also run the short real-engine scenarios")
    ap.add_argument("--out", default="results/policy_eval.json")
    args = ap.parse_args()
    started = time.perf_counter()
    results: dict = {"setup": "simulator: llama-2-7b on a10, budget 512, max_num_seqs 128; FCFS = sarathi"}
    for name, fn, arg in (
        ("vtc", vtc, args.duration),
        ("wfq", wfq, args.duration),
        ("priority", priority, args.duration),
        ("deadline", deadline, args.duration),
        ("swap", swap, args.sessions),
    ):
        rows = [
            {"max_tokens": "known" if known else "unset", **row}
            for known in (False, True)
            for row in fn(arg, known)  # type: ignore[operator]
        ]
        results[name] = rows
        table(name, rows)
    if args.real_engine:
        out_dir = Path(args.out).parent
        results["real_engine"] = real_engine(out_dir / "models")
        table("real engine (tiny-llama, CPU)", results["real_engine"])
    results["wall_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
