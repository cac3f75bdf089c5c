"""`quanta bench serve` workloads and report, without a server (the server run is in test_server.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from quanta.bench.serve import BenchResult, build_workload, parse_goodput, report
from quanta.bench.serve_args import add_bench_serve_args


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_serve_args(p)
    return p.parse_args(["--base-url", "http://x", "--model", "m", *argv])


def test_random_workload_lengths_rate_and_tenants() -> None:
    reqs = build_workload(
        _args(
            "--num-prompts",
            "40",
            "--input-len",
            "30",
            "--output-len",
            "5",
            "--request-rate",
            "10",
            "--tenants",
            "a,b",
        )
    )
    assert len(reqs) == 40
    assert all(len(r.prompt) == r.prompt_len == 30 and r.output_len == 5 for r in reqs)
    assert all(isinstance(t, int) and 0 <= t < 500 for r in reqs for t in r.prompt)
    arrivals = [r.arrival for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert 1.5 < arrivals[-1] < 8.0  # 39 gaps of mean 0.1 s
    assert [r.tenant for r in reqs[:4]] == ["a", "b", "a", "b"]
    burst = build_workload(_args("--num-prompts", "5"))
    assert all(r.arrival == 0.0 for r in burst)  # no rate: everything at once


def test_trace_workload_keeps_arrivals_and_tenants(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("arrival,prompt_len,output_len,tenant\n5.0,10,3,x\n5.5,4000,900,y\n7.0,8,2,x\n")
    reqs = build_workload(_args("--workload", str(trace), "--max-model-len", "1024"))
    assert [r.arrival for r in reqs] == [0.0, 0.5, 2.0]
    assert [r.tenant for r in reqs] == ["x", "y", "x"]
    assert reqs[1].prompt_len == 1023 and reqs[1].output_len == 1  # clipped to the context
    assert len(reqs[1].prompt) == 1023
    rescaled = build_workload(_args("--workload", str(trace), "--request-rate", "inf"))
    assert all(r.arrival == 0.0 for r in rescaled)


def test_mooncake_trace_sends_its_shared_blocks(tmp_path: Path) -> None:
    trace = tmp_path / "mooncake_trace.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [1, 2]}\n'
        '{"timestamp": 1500, "input_length": 900, "output_length": 3, "hash_ids": [1, 3]}\n'
        '{"timestamp": 2000, "input_length": 300, "output_length": 3, "hash_ids": [4]}\n'
    )
    reqs = build_workload(_args("--workload", str(trace)))
    assert [r.arrival for r in reqs] == [0.0, 1.5, 2.0]
    assert [len(r.prompt) for r in reqs] == [700, 900, 300]
    assert reqs[0].prompt[:512] == reqs[1].prompt[:512]  # block 1, sent twice
    assert sum(a == b for a, b in zip(reqs[0].prompt[512:], reqs[1].prompt[512:])) < 20  # blocks 2 and 3
    assert sum(a == b for a, b in zip(reqs[0].prompt, reqs[2].prompt)) < 20
    # Arrivals drawn at a rate keep the blocks.
    drawn = build_workload(_args("--workload", str(trace), "--request-rate", "2"))
    assert [r.prompt for r in drawn] == [r.prompt for r in reqs]


def test_mooncake_trace_saved_as_json_or_gzip_is_a_trace(tmp_path: Path) -> None:
    import gzip

    rows = [
        {"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [1, 2]},
        {"timestamp": 1500, "input_length": 900, "output_length": 3, "hash_ids": [1, 3]},
    ]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    listed, jsonl, gz = tmp_path / "list.json", tmp_path / "lines.json", tmp_path / "t.jsonl.gz"
    listed.write_text(json.dumps(rows))  # a .json file is ShareGPT's only where it holds conversations
    jsonl.write_text(lines)
    gz.write_bytes(gzip.compress(lines.encode()))
    sent = [build_workload(_args("--workload", str(p))) for p in (listed, jsonl, gz)]
    for reqs in sent:
        assert [r.arrival for r in reqs] == [0.0, 1.5] and [len(r.prompt) for r in reqs] == [700, 900]
        assert reqs[0].prompt[:512] == reqs[1].prompt[:512]
    assert sent[0][1].prompt == sent[1][1].prompt == sent[2][1].prompt
    listed.write_text('[["not", "a conversation"], {"conversations": []}]')
    with pytest.raises(ValueError, match="no usable conversations"):
        build_workload(_args("--workload", str(listed)))


def test_sharegpt_json_sends_text(tmp_path: Path) -> None:
    data = [
        {
            "conversations": [
                {"from": "human", "value": "Tell me a story"},
                {"from": "gpt", "value": "Once " * 40},
            ]
        },
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    reqs = build_workload(_args("--workload", str(path), "--num-prompts", "10"))
    assert sorted(r.prompt for r in reqs) == ["Hi", "Tell me a story"]
    story = next(r for r in reqs if r.prompt == "Tell me a story")
    assert story.output_len == len("Once " * 40) // 4
    # As the dataset is often downloaded: gzip-compressed.
    import gzip

    packed = tmp_path / "sg.json.gz"
    packed.write_bytes(gzip.compress(json.dumps(data).encode()))
    assert sorted(r.prompt for r in build_workload(_args("--workload", str(packed), "--num-prompts", "10"))) == [
        "Hi",
        "Tell me a story",
    ]


def test_goodput_and_report() -> None:
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft_slo": 0.5, "tpot_slo": 0.05}
    with pytest.raises(ValueError, match="KEY:MS"):
        parse_goodput(["latency:5"])
    results = [
        BenchResult(0, "a", True, None, 0.0, 10, 3, ttft=0.1, e2e=0.3, itl=[0.1, 0.1]),
        BenchResult(1, "b", True, None, 0.5, 10, 3, ttft=0.9, e2e=1.5, itl=[0.3, 0.3]),
        BenchResult(2, "b", False, "HTTP 500: boom", 0.6, 10),
    ]
    rep = report(results, 2.0, parse_goodput(["ttft:500"]))
    assert rep["completed"] == 2 and rep["failed"] == 1 and rep["errors"] == ["HTTP 500: boom"]
    s = rep["summary"]
    assert s["duration"] == pytest.approx(2.0)  # the benchmark's wall time
    assert s["goodput"] == pytest.approx(0.5)  # one of two meets the TTFT SLO
    assert s["tpot"]["mean"] == pytest.approx((0.1 + 0.3) / 2)
    assert set(rep["per_tenant"]) == {"a", "b"}


# Constructed results, one knob at a time: (tenant, sent, output tokens, TTFT, E2E) -> TPOT = (E2E - TTFT) / (n - 1).
_SPLIT = [
    ("a", 0.0, 5, 0.2, 0.6),  # 0: TTFT 0.2, TPOT 0.1,  E2E 0.6
    ("b", 0.1, 5, 0.8, 1.0),  # 1: TTFT 0.8, TPOT 0.05, E2E 1.0 (exactly the E2E SLO below: meets it)
    ("a", 0.2, 3, 0.3, 1.1),  # 2: TTFT 0.3, TPOT 0.4,  E2E 1.1
    ("b", 0.3, 9, 0.9, 2.5),  # 3: TTFT 0.9, TPOT 0.2,  E2E 2.5 (last to finish, at 2.8)
    ("a", 0.4, 2, 0.1, 0.15),  # 4: TTFT 0.1, TPOT 0.05, E2E 0.15
    ("b", 0.5, 4, 0.5, 1.1),  # 5: TTFT 0.5 (exactly the TTFT SLO: meets it), TPOT 0.2, E2E 1.1
]


def _split_results() -> list[BenchResult]:
    out = [
        BenchResult(i, tenant, True, None, sent, 10, n, ttft=ttft, e2e=e2e, itl=[(e2e - ttft) / (n - 1)] * (n - 1))
        for i, (tenant, sent, n, ttft, e2e) in enumerate(_SPLIT)
    ]
    # A failed request counts for no SLO, not even one it would meet.
    out.append(BenchResult(len(out), "a", False, "HTTP 500: boom", 0.6, 10))
    return out


@pytest.mark.parametrize(
    "goodput,good",
    [
        (["ttft:500"], {0, 2, 4, 5}),
        (["tpot:150"], {0, 1, 4}),
        (["e2el:1000"], {0, 1, 4}),
        (["ttft:500", "tpot:150"], {0, 4}),  # a request counts only when it meets every SLO
        (["tpot:250", "e2el:1000"], {0, 1, 4}),
        (["ttft:500", "tpot:300", "e2el:1200"], {0, 4, 5}),
        (["ttft:50"], set()),
    ],
)
def test_goodput_counts_requests_meeting_every_slo(goodput: list[str], good: set[int]) -> None:
    """vLLM's `calculate_metrics`: good requests are completed ones with every given metric <= its SLO
    (TPOT = (E2E - TTFT) / (output tokens - 1)); goodput = good requests / duration."""
    results = _split_results()
    rep = report(results, 2.8, parse_goodput(goodput))
    s = rep["summary"]
    assert s["num_requests"] == 6 and rep["failed"] == 1
    assert s["duration"] == pytest.approx(2.8)  # the benchmark's wall time
    assert s["request_throughput"] == pytest.approx(6 / 2.8)
    assert s["goodput"] == pytest.approx(len(good) / 2.8)
    assert s["tpot"]["mean"] == pytest.approx((0.1 + 0.05 + 0.4 + 0.2 + 0.05 + 0.2) / 6)
    per_tenant = rep["per_tenant"]
    for tenant in ("a", "b"):
        mine = [i for i, r in enumerate(_SPLIT) if r[0] == tenant]
        # Over the whole run, as vLLM divides: the tenants' rates add up to the total.
        assert per_tenant[tenant]["goodput"] == pytest.approx(len(good & set(mine)) / 2.8), tenant
    assert sum(t["request_throughput"] for t in per_tenant.values()) == pytest.approx(s["request_throughput"])
    assert per_tenant["a"]["failed"] == 1 and per_tenant["b"]["failed"] == 0


def test_goodput_one_token_request_meets_tpot_slo_as_in_vllm() -> None:
    """vLLM's calculate_metrics takes a one-token request's TPOT as 0: it meets every TPOT SLO."""
    results = [
        BenchResult(0, "a", True, None, 0.0, 10, 1, ttft=0.2, e2e=0.2),  # TPOT undefined (vLLM: 0)
        BenchResult(1, "a", True, None, 0.0, 10, 3, ttft=0.2, e2e=1.0, itl=[0.4, 0.4]),  # TPOT 0.4
    ]
    rep = report(results, 1.0, parse_goodput(["tpot:100"]))
    assert rep["summary"]["goodput"] == pytest.approx(1 / 1.0)


def test_streams_are_timed_and_counted_as_vllm_does() -> None:
    """A scripted server: CRLF event ends (valid SSE), a chunk of empty text (a special token), no usage,
    a finish-only chunk, and a request answered with an error event of a plain string."""
    import asyncio

    from aiohttp import web

    from quanta.bench.serve import BenchRequest, run_bench

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if body["prompt"] == [9]:
            await resp.write(b'data: {"error": "the engine is gone"}\r\n\r\n')
            return resp
        seen.append((body.get("tenant"), body.get("user")))
        for text, finish in (("Hello", None), ("", None), (" world", None), ("", "length")):
            await asyncio.sleep(0.02)
            chunk = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
        await resp.write(b"data: [DONE]\r\n\r\n")
        return resp

    async def main() -> tuple:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            reqs = [BenchRequest(0.0, [5, 6], 2, 4, "t1"), BenchRequest(0.0, [9], 1, 4, "t2")]
            return await run_bench(
                f"http://127.0.0.1:{port}", "m", reqs, progress=False, count_tokens=lambda s: len(s.split())
            )
        finally:
            await runner.cleanup()

    seen: list = []
    (ok, failed), wall = asyncio.run(main())
    assert ok.ok and ok.ttft is not None and len(ok.itl) == 3  # every chunk with a choice is an event
    assert ok.output_tokens == 2  # no usage: "Hello world" re-tokenized (two words here)
    assert seen == [("t1", "t1")]  # the tenant goes as quanta's field and as OpenAI's user
    assert not failed.ok and failed.error == "RuntimeError: the engine is gone"
    rep = report([ok, failed], wall, {})
    assert rep["summary"]["request_throughput"] == pytest.approx(1 / wall)  # over the whole run
    assert rep["per_tenant"]["t2"]["failed"] == 1 and rep["per_tenant"]["t2"]["request_throughput"] == 0


def test_bench_arguments_and_a_trace_without_arrivals(tmp_path: Path) -> None:
    for argv, match in [
        (("--burstiness", "0"), "burstiness"),
        (("--request-rate", "0"), "request-rate"),
        (("--max-concurrency", "0"), "max-concurrency"),
        (("--num-prompts", "0"), "num-prompts"),
        (("--output-len", "0"), "output-len"),
        (("--tenants", "a,,b"), "tenants"),
        (("--endpoint", "/v1/chat/completions"), "give --tokenizer"),  # token-id prompts are not text
    ]:
        with pytest.raises(ValueError, match=match):
            build_workload(_args(*argv))
    for bad in ("ttft:-5", "ttft:abc"):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput([bad])
    trace = tmp_path / "t.csv"
    trace.write_text("prompt_len,output_len\n10,3\n20,4\n30,5\n")
    assert [r.arrival for r in build_workload(_args("--workload", str(trace)))] == [0.0, 0.0, 0.0]
    rep = report([BenchResult(0, "default", False, "HTTP 500: x", 0.0, 10)], 1.0, {})
    from quanta.metrics import json_safe

    json.dumps(json_safe(rep), allow_nan=False)  # nothing completed: no NaN left in the JSON
