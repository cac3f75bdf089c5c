"""Terminal tables and JSON for simulation results."""

from __future__ import annotations

from collections.abc import Sequence

from quanta.sim.simulation import SimResult


def result_row(name: str, result: SimResult, **slos: float | None) -> dict:
    s = result.summary(**slos)
    tenants = result.summary_by_tenant(**slos)
    return {
        "policy": name,
        **s.as_dict(),
        "per_tenant": {t: v.as_dict() for t, v in tenants.items()} if len(tenants) > 1 else {},
        "peak_kv_usage": result.peak_kv_usage,
        "num_steps": result.num_steps,
        "prefill_saved": result.prefill_saved_fraction,
        "num_decode_runs": result.num_decode_runs,
        "simulated_seconds": result.simulated_seconds,
        "wall_seconds": result.wall_seconds,
        # Time-between-tokens percentiles: exact, or from histograms within 1% (large runs).
        "itl_exact": result.stream.itl_exact,
        "simulated_requests_per_wall_second": result.num_requests / max(result.wall_seconds, 1e-9),
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
        ("peak KV", lambda r: "" if r["peak_kv_usage"] is None else f"{r['peak_kv_usage']:.0%}"),
    ]
    for name, _ in cols:
        table.add_column(name, justify="right")
    if any(r["goodput"] is not None for r in rows):
        cols.append(("goodput req/s", lambda r: f"{r['goodput']:.2f}"))
    for name, _ in cols[len(table.columns) :]:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*(fmt(r) for _, fmt in cols))
        for tenant, t in r["per_tenant"].items():
            table.add_row(
                *(
                    fmt(
                        {
                            **t,
                            "policy": f"  {r['policy']}/{tenant}",
                            "peak_kv_usage": None,
                            "per_tenant": {},
                        }
                    )
                    for _, fmt in cols
                )
            )
    Console().print(table)
