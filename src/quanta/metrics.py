"""Latency and throughput metrics from per-request clock readings, the same in engine, server and simulator.

Definitions follow vLLM's benchmarks: TTFT = first token - arrival; ITL/TBT = gaps between consecutive
tokens; TPOT = (finish - first token) / (outputs - 1); E2E = finish - arrival; scheduling delay =
first scheduled - arrival. Goodput counts requests that meet every given SLO.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from quanta.request import Request

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestMetrics:
    request_id: str
    tenant: str
    arrival: float
    num_prompt_tokens: int
    num_output_tokens: int
    ttft: float | None
    e2e: float | None
    tpot: float | None
    scheduling_delay: float | None
    itl: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    @classmethod
    def of(cls, req: Request) -> RequestMetrics:
        t = req.times
        ttft = None if t.first_token is None else t.first_token - t.arrival
        e2e = None if t.finished is None else t.finished - t.arrival
        n = len(t.tokens)
        tpot = (t.tokens[-1] - t.tokens[0]) / (n - 1) if n > 1 else None
        delay = None if t.first_scheduled is None else t.first_scheduled - t.arrival
        itl = [b - a for a, b in zip(t.tokens, t.tokens[1:])]
        return cls(
            req.request_id,
            req.tenant,
            t.arrival,
            req.num_prompt_tokens,
            n,
            ttft,
            e2e,
            tpot,
            delay,
            itl,
            req.num_preemptions,
        )

    def meets(
        self, ttft_slo: float | None = None, tpot_slo: float | None = None, e2e_slo: float | None = None
    ) -> bool:
        checks = ((self.ttft, ttft_slo), (self.tpot, tpot_slo), (self.e2e, e2e_slo))
        return all(slo is None or (value is not None and value <= slo) for value, slo in checks)


def distribution(values: Iterable[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (NaN when there are no values)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


@dataclass(slots=True)
class Summary:
    num_requests: int
    duration: float  # first arrival to last finish
    request_throughput: float  # requests per second
    output_throughput: float  # output tokens per second
    total_token_throughput: float  # prompt + output tokens per second
    goodput: float | None  # requests per second meeting every SLO (None: no SLO given)
    ttft: dict[str, float]
    itl: dict[str, float]
    tpot: dict[str, float]
    e2e: dict[str, float]
    scheduling_delay: dict[str, float]
    num_preemptions: int

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


def summarize(
    metrics: Sequence[RequestMetrics],
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    e2e_slo: float | None = None,
) -> Summary:
    done = [m for m in metrics if m.e2e is not None]
    if done:
        start = min(m.arrival for m in done)
        duration = max(m.arrival + m.e2e for m in done if m.e2e is not None) - start
    else:
        duration = 0.0
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: float("nan"))
    has_slo = any(s is not None for s in (ttft_slo, tpot_slo, e2e_slo))
    good = sum(1 for m in done if m.meets(ttft_slo, tpot_slo, e2e_slo))
    return Summary(
        num_requests=len(done),
        duration=duration,
        request_throughput=rate(len(done)),
        output_throughput=rate(sum(m.num_output_tokens for m in done)),
        total_token_throughput=rate(sum(m.num_output_tokens + m.num_prompt_tokens for m in done)),
        goodput=rate(good) if has_slo else None,
        ttft=distribution(m.ttft for m in done if m.ttft is not None),
        itl=distribution(x for m in done for x in m.itl),
        tpot=distribution(m.tpot for m in done if m.tpot is not None),
        e2e=distribution(m.e2e for m in done if m.e2e is not None),
        scheduling_delay=distribution(m.scheduling_delay for m in done if m.scheduling_delay is not None),
        num_preemptions=sum(m.num_preemptions for m in done),
    )


def summarize_by_tenant(metrics: Sequence[RequestMetrics], **slos: float | None) -> dict[str, Summary]:
    groups: dict[str, list[RequestMetrics]] = defaultdict(list)
    for m in metrics:
        groups[m.tenant].append(m)
    return {tenant: summarize(ms, **slos) for tenant, ms in sorted(groups.items())}
