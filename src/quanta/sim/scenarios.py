"""Multi-tenant workloads for evaluating policies (../shared/specs/fairness.md, deadlines, fastswitch).

Each builder returns trace rows (WorkloadRequest), so the same scenario runs in the simulator, on the
real engine, or from a written trace file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quanta.request import Request
from quanta.sim.workload import LengthDist, WorkloadRequest, poisson_arrivals


def tenant_stream(
    tenant: str,
    rate: float,
    duration: float,
    prompt_len: int | LengthDist,
    output_len: int | LengthDist,
    rng: np.random.Generator,
    start: float = 0.0,
    **fields: object,
) -> list[WorkloadRequest]:
    """Poisson arrivals of one tenant over [start, start + duration)."""
    n = max(int(rate * duration * 1.5) + 10, 1)
    arrivals = start + poisson_arrivals(rate, n, rng) + rng.exponential(1.0 / rate)
    arrivals = arrivals[arrivals < start + duration]
    k = len(arrivals)
    p = prompt_len.sample(rng, k) if isinstance(prompt_len, LengthDist) else np.full(k, prompt_len)
    o = output_len.sample(rng, k) if isinstance(output_len, LengthDist) else np.full(k, output_len)
    return [
        WorkloadRequest(float(a), int(x), int(y), tenant=tenant, **fields) for a, x, y in zip(arrivals, p, o)
    ]  # type: ignore[arg-type]


def merge(*streams: Sequence[WorkloadRequest]) -> list[WorkloadRequest]:
    return sorted((r for s in streams for r in s), key=lambda r: r.arrival)


def two_tenants(
    duration: float = 360.0, rates: tuple[float, float] = (1.5, 3.0), seed: int = 0
) -> list[WorkloadRequest]:
    """VTC's first synthetic suite: two tenants at 1.5 and 3 req/s, 256-token prompts and outputs."""
    rng = np.random.default_rng(seed)
    return merge(*(tenant_stream(f"t{i}", r, duration, 256, 256, rng) for i, r in enumerate(rates)))


def eight_tenants(duration: float = 360.0, seed: int = 0) -> list[WorkloadRequest]:
    """Eight tenants at 0.25 .. 2 req/s (256 / 256 tokens): several above their fair share."""
    rng = np.random.default_rng(seed)
    return merge(*(tenant_stream(f"t{i}", 0.25 * (i + 1), duration, 256, 256, rng) for i in range(8)))


def on_off(duration: float = 360.0, period: float = 60.0, seed: int = 0) -> list[WorkloadRequest]:
    """Tenant t0 sends 2 req/s throughout; t1 sends 3 req/s, on for `period` seconds then off."""
    rng = np.random.default_rng(seed)
    t1 = [
        r
        for k in range(int(duration // (2 * period)) + 1)
        for r in tenant_stream("t1", 3.0, period, 256, 256, rng, start=2 * k * period)
        if r.arrival < duration
    ]
    return merge(tenant_stream("t0", 2.0, duration, 256, 256, rng), t1)


def heavy_and_light(
    n_light: int = 60,
    ratio: int = 10,
    light: tuple[int, int] = (128, 64),
    heavy: tuple[int, int] = (512, 256),
    rate: float = 3.0,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """One tenant sends `ratio` times the requests of another, and bigger ones (UWFQ's setting)."""
    rng = np.random.default_rng(seed)
    duration = n_light * ratio / rate
    return merge(
        tenant_stream("heavy", rate, duration, *heavy, rng),
        tenant_stream("light", rate / ratio, duration, *light, rng),
    )


# ShareGPT-like conversation lengths (prompt, output).
CHAT_LENGTHS = (LengthDist("lognormal", 400, 1200, high=1536), LengthDist("lognormal", 200, 450, high=512))


def priority_mix(
    duration: float = 300.0, rate: float = 3.0, high_fraction: float = 0.1, seed: int = 0
) -> list[WorkloadRequest]:
    """`high_fraction` of the requests at priority 0, the rest at 1; ShareGPT-like conversation lengths."""
    rng = np.random.default_rng(seed)
    prompt, output = CHAT_LENGTHS
    return merge(
        tenant_stream("high", rate * high_fraction, duration, prompt, output, rng, priority=0),
        tenant_stream("low", rate * (1 - high_fraction), duration, prompt, output, rng, priority=1),
    )


# The two SLO classes of `slo_mix` (give them to the deadline policy as policy_args["slo_classes"]).
SLO_CLASSES = {"interactive": {"ttft": 1.0, "tpot": 0.1}, "batch": {"ttft": 10.0, "tpot": 0.25}}


def deadline_of(req: Request, classes: dict = SLO_CLASSES) -> float:
    """A request's end-to-end deadline from its SLO class: arrival + TTFT + TPOT per further token, for
    the tokens it produced (after a simulation its true length, or where max_tokens or the context cut
    it). Not max_tokens: a client usually sets none."""
    slo = classes[req.slo_class]
    return req.arrival_time + slo["ttft"] + slo["tpot"] * max(req.num_output_tokens - 1, 0)


def slo_mix(
    duration: float = 300.0, rate: float = 3.0, interactive_fraction: float = 0.3, seed: int = 0
) -> list[WorkloadRequest]:
    """Two SLO classes: 'interactive' (priority 0) and 'batch' (priority 1)."""
    rng = np.random.default_rng(seed)
    prompt, output = CHAT_LENGTHS
    return merge(
        tenant_stream(
            "interactive",
            rate * interactive_fraction,
            duration,
            prompt,
            output,
            rng,
            priority=0,
            slo_class="interactive",
        ),
        tenant_stream(
            "batch",
            rate * (1 - interactive_fraction),
            duration,
            prompt,
            output,
            rng,
            priority=1,
            slo_class="batch",
        ),
    )


def multi_turn_chat(
    n_sessions: int = 200,
    rate: float = 1.0,
    turns: float = 5.5,
    think: float = 10.0,
    levels: int = 4,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """FastSwitch-style conversations: Poisson session starts, ~`turns` turns each; a turn's prompt is
    the conversation so far plus a new message; every turn draws a random priority (frequent changes of
    who is most important, so the scheduler preempts often). Open loop: a turn arrives a think time
    after the previous turn's arrival, not after its answer."""
    rng = np.random.default_rng(seed)
    msg, reply = LengthDist("lognormal", 80, 300, high=1024), LengthDist("lognormal", 200, 450, high=768)
    starts = poisson_arrivals(rate, n_sessions, rng)
    out: list[WorkloadRequest] = []
    for s, start in enumerate(starts):
        n_turns = 1 + rng.geometric(1.0 / turns)
        t, context = float(start), 0
        for _ in range(n_turns):
            p, o = int(msg.sample(rng, 1)[0]), int(reply.sample(rng, 1)[0])
            if context + p + o > 4000:
                break
            out.append(
                WorkloadRequest(
                    t,
                    context + p,
                    o,
                    tenant=f"s{s % 8}",
                    priority=int(rng.integers(levels)),
                    session_id=f"s{s}",
                )
            )
            context += p + o
            t += think + rng.exponential(think)
    return merge(out)
