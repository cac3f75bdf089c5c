"""PNG plots of simulation results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from quanta.sim.capacity import CapacityResult
from quanta.sim.simulation import SimResult


def pyplot():
    """matplotlib.pyplot on the headless backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(results: Mapping[str, SimResult], path: str | Path) -> Path:
    """TTFT and time-between-tokens CDFs, one line per policy."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results.items():
        ttft = np.sort(res.stream.column("ttft"))
        ttft = ttft[~np.isnan(ttft)]
        axes[0].plot(ttft, np.arange(1, len(ttft) + 1) / max(len(ttft), 1), label=name)
        axes[1].plot(*res.stream.itl_cdf(), label=name)
    for ax, title in zip(axes, ("time to first token (s)", "time between tokens (s)")):
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests" if ax is axes[0] else "fraction of tokens")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_kv_usage(results: Mapping[str, SimResult], path: str | Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, res in results.items():
        for i, series in enumerate(res.kv_usage):
            if series:
                t, u = zip(*series)
                ax.plot(t, np.asarray(u) * 100, label=name if i == 0 else None, lw=0.8)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("KV blocks in use (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_capacity_sweep(results: Sequence[CapacityResult], tbt_slo: float, path: str | Path) -> Path:
    """Request rate against P99 TBT (with the SLO line) and against median TTFT, for every rate a
    capacity search evaluated."""
    plt = pyplot()
    fig, (tbt, ttft) = plt.subplots(1, 2, figsize=(12, 4))
    for res in results:
        evals = sorted(res.evaluations, key=lambda e: e.qps)
        qps = [e.qps for e in evals]
        tbt.plot(
            qps, [e.p99_tbt for e in evals], marker="o", label=f"{res.policy} (capacity {res.qps:.3g} req/s)"
        )
        ttft.plot(qps, [e.p50_ttft for e in evals], marker="o", label=res.policy)
    tbt.axhline(tbt_slo, color="gray", ls="--", label=f"SLO {tbt_slo} s")
    for ax, label in ((tbt, "P99 time between tokens (s)"), (ttft, "median time to first token (s)")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
