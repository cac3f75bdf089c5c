"""Capacity: the highest request rate a deployment sustains within its latency targets.

Sarathi-Serve's definition: P99 time-between-tokens <= the TBT SLO and median scheduling delay <= 2 s.
The search doubles the rate until the targets fail, then bisects to a relative tolerance (the paper
used 2.5%). Every rate replays the same requests (one workload drawn at 1 req/s, arrivals scaled), so
points differ only by load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from quanta.sim.simulation import SimConfig, simulate
from quanta.sim.workload import WorkloadRequest, scale_rate


@dataclass(slots=True)
class Evaluation:
    qps: float
    p99_tbt: float
    p50_scheduling_delay: float
    p50_ttft: float
    ok: bool


@dataclass(slots=True)
class CapacityResult:
    policy: str
    qps: float  # highest rate found that meets the targets (0.0: none)
    evaluations: list[Evaluation] = field(default_factory=list)
    # The targets still held at the search's highest rate: the capacity is at least `qps`, not `qps`
    # (a workload too short to load the deployment drains at any rate).
    at_search_limit: bool = False


def at_unit_rate(reqs: Sequence[WorkloadRequest]) -> list[WorkloadRequest]:
    """A trace with its own arrivals, played at 1 request per second on average (its pattern kept), as
    `find_capacity` wants its workload: then the search's rates are requests per second."""
    span = reqs[-1].arrival - reqs[0].arrival if reqs else 0.0
    if span <= 0:  # all at once: no rate to rescale
        return list(reqs)
    rate = (len(reqs) - 1) / span
    return scale_rate(reqs, 1.0 / rate)  # played 1/rate times faster: rate * (1/rate) = 1 req/s


def evaluate(
    base: Sequence[WorkloadRequest], qps: float, cfg: SimConfig, tbt_slo: float, max_delay: float
) -> Evaluation:
    s = simulate(scale_rate(base, qps), cfg).summary()
    p99, delay = s.itl["p99"], s.scheduling_delay["p50"]
    return Evaluation(qps, p99, delay, s.ttft["p50"], bool(p99 <= tbt_slo and delay <= max_delay))


def find_capacity(
    base: Sequence[WorkloadRequest],
    cfg: SimConfig,
    tbt_slo: float,
    max_scheduling_delay: float = 2.0,
    start_qps: float = 1.0,
    tolerance: float = 0.025,
    max_qps: float = 10_000.0,
    on_eval: Callable[[Evaluation], None] | None = None,
) -> CapacityResult:
    """`base`: a workload whose arrivals are at 1 req/s (see `at_unit_rate`)."""
    if not (tbt_slo > 0 and max_scheduling_delay > 0):  # also refuses nan
        raise ValueError("the TBT target and the maximum scheduling delay must be positive")
    result = CapacityResult(cfg.policy, 0.0)

    def run(qps: float) -> bool:
        e = evaluate(base, qps, cfg, tbt_slo, max_scheduling_delay)
        result.evaluations.append(e)
        if on_eval is not None:
            on_eval(e)
        return e.ok

    good, bad = 0.0, None
    qps = start_qps
    while qps <= max_qps:  # bracket: double while the targets hold, halve while they fail
        if run(qps):
            good = qps
            if bad is not None:
                break
            qps *= 2
        else:
            bad = qps
            if good > 0:
                break
            qps /= 2
            if qps < start_qps / 1024:
                return result
    if bad is None:
        result.qps, result.at_search_limit = good, True
        return result
    while (bad - good) > tolerance * good:
        mid = (good + bad) / 2
        if run(mid):
            good = mid
        else:
            bad = mid
    result.qps = good
    return result
