"""Terminal tables and JSON for simulation results."""

from __future__ import annotations

from collections.abc import Sequence

from quanta.metrics import summarize
from quanta.sim.simulation import SimResult


def result_row(name: str, result: SimResult) -> dict:
    s = summarize(result.metrics())
    peak_kv = max((u for replica in result.kv_usage for _, u in replica), default=0.0)
    return {
        "policy": name,
        **s.as_dict(),
        "peak_kv_usage": peak_kv,
        "num_steps": result.num_steps,
        "simulated_requests_per_wall_second": len(result.requests) / max(result.wall_seconds, 1e-9),
    }


def print_comparison(rows: Sequence[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = [
        ("policy", lambda r: r["policy"]),
        ("TTFT p50 s", lambda r: f"{r['ttft']['p50']:.3f}"),
        ("TTFT p99 s", lambda r: f"{r['ttft']['p99']:.3f}"),
        ("TBT p50 s", lambda r: f"{r['itl']['p50']:.4f}"),
        ("TBT p99 s", lambda r: f"{r['itl']['p99']:.4f}"),
        ("E2E p50 s", lambda r: f"{r['e2e']['p50']:.2f}"),
        ("sched delay p50 s", lambda r: f"{r['scheduling_delay']['p50']:.3f}"),
        ("out tok/s", lambda r: f"{r['output_throughput']:.0f}"),
        ("preempt", lambda r: str(r["num_preemptions"])),
        ("peak KV", lambda r: f"{r['peak_kv_usage']:.0%}"),
    ]
    for name, _ in cols:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*(fmt(r) for _, fmt in cols))
    Console().print(table)
