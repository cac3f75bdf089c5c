"""Reports of agent-program runs: job completion time per program, TTFT per call, prefix hits by turn,
KV usage and pinned KV over time. The simulator, `quanta simulate --programs` and the benchmarks share it."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from quanta.sim.programs import ProgramSource

HIT_TURNS = (1, 2, 4, 8)  # turns (0-based) whose hit rates the report shows


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def program_metrics(source: ProgramSource, makespan: float) -> dict:
    """JCT (mean, P50, P99), programs per second over `makespan`, TTFT per call, and the share of later
    calls' prompt tokens served from the prefix cache (overall and at some turns), from a finished run."""
    jct = [r.jct for r in source.records if r.jct is not None]
    calls = [t for r in source.records for t in r.turns]
    ttft = [t.first_token - t.arrival for t in calls if t.first_token is not None]
    later = [t for r in source.records for t in r.turns[1:]]
    by_turn: dict[str, float] = {}
    for k in HIT_TURNS:
        ts = [r.turns[k] for r in source.records if len(r.turns) > k]
        if ts:
            by_turn[f"turn{k}"] = sum(t.cached_tokens for t in ts) / sum(t.prompt_len for t in ts)
    return {
        "programs": len(jct),
        "jct_mean": statistics.mean(jct) if jct else float("nan"),
        "jct_p50": _pct(jct, 50),
        "jct_p99": _pct(jct, 99),
        "programs_per_s": len(jct) / makespan if makespan > 0 else float("nan"),
        "ttft_mean": statistics.mean(ttft) if ttft else float("nan"),
        "ttft_p99": _pct(ttft, 99),
        "ttft_max": max(ttft, default=float("nan")),
        "hit_rate": sum(t.cached_tokens for t in later) / max(sum(t.prompt_len for t in later), 1),
        "hit_by_turn": by_turn,
        "preemptions": sum(t.preemptions for t in calls),
    }


def mean_usage(points: Sequence[tuple[float, float]], lo: float = 0.2, hi: float = 0.8) -> float:
    """Time-weighted mean of (time, value) points between fractions lo and hi of the run (warm-up and
    drain left out)."""
    if len(points) < 2:
        return 0.0
    t0, t1 = points[0][0], points[-1][0]
    a_lo, a_hi = t0 + lo * (t1 - t0), t0 + hi * (t1 - t0)
    num = den = 0.0
    for (a, u), (b, _) in itertools.pairwise(points):
        if a_lo <= a <= a_hi:
            num, den = num + (b - a) * u, den + (b - a)
    return num / den if den else 0.0


def with_ratios(rows: list[dict], base: str) -> list[dict]:
    """Adds each row's JCT speed-up, throughput ratio and max-TTFT ratio against the `base` policy's row."""
    ref = next((r for r in rows if r["policy"] == base), rows[0])
    for r in rows:
        r["jct_x"] = ref["jct_mean"] / r["jct_mean"]
        r["tput_x"] = r["programs_per_s"] / ref["programs_per_s"]
        r["ttft_max_vs_base"] = r["ttft_max"] / ref["ttft_max"]
    return rows


def print_table(title: str, rows: Sequence[Mapping], cols: Sequence[str]) -> None:
    print(f"\n== {title}")
    cells = [[_f(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _f(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def plot_programs(
    folder: str | Path,
    usage: Mapping[str, Sequence[tuple[float, float]]],
    pinned: Mapping[str, Sequence[tuple[float, float]]],
    jct: Mapping[str, Sequence[float]],
) -> list[Path]:
    """KV in use and pinned over time (per policy), and the CDF of job completion times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for policy, pts in usage.items():
        if pts:
            t, u = zip(*pts)
            axes[0].plot(t, u, label=policy, lw=0.8)
        if pinned.get(policy):
            t, p = zip(*pinned[policy])
            axes[1].step(t, p, where="post", label=policy, lw=0.8)
    axes[0].set_ylabel("KV in use (fraction)")
    axes[1].set_ylabel("KV pinned (fraction)")
    axes[1].set_xlabel("time (s)")
    axes[0].legend()
    fig.tight_layout()
    kv_path = folder / "program_kv.png"
    fig.savefig(kv_path, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for policy, xs in jct.items():
        xs = sorted(xs)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=policy)
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("fraction of programs")
    ax.legend()
    fig.tight_layout()
    jct_path = folder / "program_jct_cdf.png"
    fig.savefig(jct_path, dpi=120)
    plt.close(fig)
    return [kv_path, jct_path]
