"""Metrics on hand-made timelines, and on a run of the real scheduler in virtual time."""

from __future__ import annotations

import math

import pytest

from helpers import STEP_TIME, make_request, null_engine
from quanta.engine.arrivals import run_arrivals
from quanta.metrics import RequestMetrics, distribution, summarize, summarize_by_tenant
from quanta.request import Request
from quanta.sampling_params import SamplingParams


def timeline(
    rid: str, arrival: float, scheduled: float, tokens: list[float], tenant: str = "a", prompt: int = 10
) -> Request:
    r = Request(
        rid,
        list(range(1, prompt + 1)),
        SamplingParams(max_tokens=len(tokens)),
        arrival_time=arrival,
        tenant=tenant,
    )
    r.times.first_scheduled = scheduled
    for t in tokens:
        r.append_output_token(7, t)
    r.times.finished = tokens[-1]
    return r


def test_request_metrics_by_hand() -> None:
    m = RequestMetrics.of(timeline("x", 1.0, 1.5, [2.0, 2.1, 2.3, 2.6]))
    assert m.ttft == pytest.approx(1.0)
    assert m.scheduling_delay == pytest.approx(0.5)
    assert m.e2e == pytest.approx(1.6)
    assert m.itl == pytest.approx([0.1, 0.2, 0.3])
    assert m.tpot == pytest.approx(0.6 / 3)
    one = RequestMetrics.of(timeline("y", 0.0, 0.0, [0.4]))
    assert one.tpot is None and one.itl == []
    assert m.meets(ttft_slo=1.0, tpot_slo=0.21) and not m.meets(ttft_slo=0.9)


def test_summary_throughput_percentiles_goodput_and_tenants() -> None:
    reqs = [
        timeline("a1", 0.0, 0.0, [1.0, 2.0], tenant="a", prompt=10),
        timeline("a2", 1.0, 1.0, [1.5, 2.5, 3.5], tenant="a", prompt=20),
        timeline("b1", 2.0, 3.0, [4.0], tenant="b", prompt=30),
    ]
    metrics = [RequestMetrics.of(r) for r in reqs]
    s = summarize(metrics, ttft_slo=1.0)
    assert s.duration == pytest.approx(4.0)  # first arrival 0, last finish 4
    assert s.request_throughput == pytest.approx(3 / 4)
    assert s.output_throughput == pytest.approx(6 / 4)
    assert s.total_token_throughput == pytest.approx((6 + 60) / 4)
    assert s.goodput == pytest.approx(2 / 4)  # b1 waited 2 s for its first token
    assert s.ttft["p50"] == pytest.approx(1.0) and s.ttft["mean"] == pytest.approx((1.0 + 0.5 + 2.0) / 3)
    assert s.itl["mean"] == pytest.approx(1.0)
    by = summarize_by_tenant(metrics)
    assert set(by) == {"a", "b"} and by["a"].num_requests == 2 and by["b"].goodput is None
    assert math.isnan(distribution([])["p99"])
    assert distribution(range(101))["p90"] == pytest.approx(90.0)


# Binary fractions, so the requests sitting exactly on an SLO stay exactly on it.
#        arrival, token times               TTFT   TPOT   E2E
_SPLIT = [
    ("a", 0.0, [0.25, 0.5, 0.75]),  #      0.25   0.25   0.75
    ("b", 0.0, [1.0, 1.125, 1.25]),  #     1.0    0.125  1.25
    ("a", 0.5, [0.75, 2.75]),  #           0.25   2.0    2.25
    ("b", 1.0, [3.0, 3.5, 4.0, 4.5]),  #   2.0    0.5    3.5
    ("b", 1.0, [1.5, 1.75]),  #            0.5    0.25   0.75
]


@pytest.mark.parametrize(
    "slos,good",
    [
        (dict(ttft_slo=0.5), {0, 2, 4}),
        (dict(tpot_slo=0.25), {0, 1, 4}),
        (dict(e2e_slo=1.25), {0, 1, 4}),
        (dict(ttft_slo=0.5, tpot_slo=0.5), {0, 4}),  # every given SLO must hold
        (dict(ttft_slo=2.0, tpot_slo=0.5), {0, 1, 3, 4}),
        (dict(ttft_slo=0.5, e2e_slo=2.25), {0, 2, 4}),
        (dict(ttft_slo=0.5, tpot_slo=0.25, e2e_slo=0.75), {0, 4}),
        (dict(ttft_slo=0.2), set()),
    ],
)
def test_goodput_with_slos_that_split_the_requests(slos: dict, good: set[int]) -> None:
    """vLLM's goodput: requests meeting every given SLO (TPOT = (E2E - TTFT) / (outputs - 1)), per second."""
    reqs = [timeline(f"x{i}", arr, arr, toks, tenant=t) for i, (t, arr, toks) in enumerate(_SPLIT)]
    metrics = [RequestMetrics.of(r) for r in reqs]
    assert [m.tpot for m in metrics] == [0.25, 0.125, 2.0, 0.5, 0.25]
    assert {i for i, m in enumerate(metrics) if m.meets(**slos)} == good
    s = summarize(metrics, **slos)
    assert s.duration == 4.5 and s.goodput == pytest.approx(len(good) / 4.5)
    by = summarize_by_tenant(metrics, **slos)
    assert by["a"].goodput == pytest.approx(len(good & {0, 2}) / 2.75)  # 0 to 2.75
    assert by["b"].goodput == pytest.approx(len(good & {1, 3, 4}) / 4.5)  # 0 to 4.5


def test_a_one_token_answer_meets_any_tpot_target() -> None:
    one = RequestMetrics.of(timeline("one", 0.0, 0.0, [0.1]))
    assert one.tpot is None and one.meets(tpot_slo=1e-9) and not one.meets(ttft_slo=0.05, tpot_slo=1e-9)
    assert summarize([one], tpot_slo=1e-9).goodput == pytest.approx(1 / 0.1)


def test_metrics_of_a_virtual_time_run() -> None:
    core = null_engine("sarathi", budget=16, num_blocks=256)
    reqs = [
        make_request(f"r{i}", prompt_len=20, max_tokens=5, arrival=0.05 * i, first_token=100 * i)
        for i in range(4)
    ]
    run_arrivals(core, reqs)
    metrics = [RequestMetrics.of(r) for r in reqs]
    # Each prompt takes two steps (16 + 4 tokens), then one token per step: the first token arrives
    # two steps after admission and tokens are one step apart while nothing else shares the budget.
    assert all(m.num_output_tokens == 5 for m in metrics)
    assert metrics[0].ttft == pytest.approx(2 * STEP_TIME)
    assert metrics[0].itl == pytest.approx([STEP_TIME] * 4)
    assert summarize(metrics).num_requests == 4
