"""Service accounting for fairness: how much each tenant received over time, and the largest gap
between tenants while they were all backlogged (VTC's "accumulated service difference").

Service counts w_p per prompt token, charged when the request is first scheduled, and w_q per output
token when it is produced, divided by the tenant's weight; computed from the requests' clock readings,
so it reads the same from the engine and the simulator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from quanta.request import Request


@dataclass(slots=True)
class ServiceGap:
    max_gap: float  # largest service difference between backlogged tenants
    final_gap: float  # the difference at the last instant they were all backlogged
    shares: dict[str, float]  # each tenant's fraction of the service while all were backlogged
    backlogged_seconds: float


def service_at(reqs: Sequence[Request], times: np.ndarray, w_p: float = 1.0, w_q: float = 2.0) -> np.ndarray:
    """Cumulative (unweighted) service of these requests at each time."""
    events: list[tuple[float, float]] = []
    for r in reqs:
        if r.times.first_scheduled is not None:
            events.append((r.times.first_scheduled, w_p * r.num_prompt_tokens))
        events.extend((t, w_q) for t in r.times.tokens)
    if not events:
        return np.zeros_like(times)
    events.sort()
    at = np.array([t for t, _ in events])
    cum = np.cumsum([v for _, v in events])
    idx = np.searchsorted(at, times, side="right")
    return np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0.0)


def backlogged_at(reqs: Sequence[Request], times: np.ndarray) -> np.ndarray:
    """Whether any of these requests is queued (arrived, not yet scheduled), at each time: VTC's
    backlogged client."""
    out = np.zeros(len(times), dtype=bool)
    for r in reqs:
        end = r.times.first_scheduled if r.times.first_scheduled is not None else np.inf
        out |= (times >= r.arrival_time) & (times < end)
    return out


def service_gap(
    reqs: Sequence[Request],
    tenants: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    dt: float = 0.25,
    w_p: float = 1.0,
    w_q: float = 2.0,
) -> ServiceGap:
    """Service difference among `tenants` (default: all) over the instants where all are backlogged.
    The service counted is what they received within those instants' span."""
    by_tenant: dict[str, list[Request]] = {}
    for r in reqs:
        by_tenant.setdefault(r.tenant, []).append(r)
    names = sorted(tenants if tenants is not None else by_tenant)
    end = max((r.times.finished or r.arrival_time) for r in reqs)
    times = np.arange(0.0, end + dt, dt)
    weights = weights or {}
    service = {t: service_at(by_tenant.get(t, []), times, w_p, w_q) / weights.get(t, 1.0) for t in names}
    both = np.logical_and.reduce([backlogged_at(by_tenant.get(t, []), times) for t in names])
    if not both.any():
        return ServiceGap(0.0, 0.0, {t: float("nan") for t in names}, 0.0)
    # Service received within backlogged spans only: differences of the cumulative curves step by step.
    inc = {t: np.diff(service[t], prepend=0.0) * both for t in names}
    acc = {t: np.cumsum(inc[t]) for t in names}
    stacked = np.stack([acc[t] for t in names])
    gaps = stacked.max(axis=0) - stacked.min(axis=0)
    last = np.flatnonzero(both)[-1]
    total = sum(acc[t][-1] for t in names)
    shares = {t: float(acc[t][-1] / total) if total else float("nan") for t in names}
    return ServiceGap(float(gaps.max()), float(gaps[last]), shares, float(both.sum() * dt))
