"""A program driven through the official `openai` client keeps its KV across turns (continuum pins)."""

from __future__ import annotations

from pathlib import Path

from tests.server_harness import MODEL, InProcessServer

HITS = ("quanta:prefix_cache_hits_total", (("model_name", MODEL),))


def program_hits(model_dir: Path, policy: str) -> float:
    """Prefix-cache hits (tokens) of a program's second turn, after other traffic cycled the whole pool
    through the LRU list while the program's tool ran."""
    engine_args = {"policy": policy, "num_kv_blocks": 48, "policy_args": {"ttl_s": 60.0}}
    with InProcessServer(model_dir, engine_args) as srv:
        client = srv.client()
        turn1 = [5 + i % 400 for i in range(160)]  # 10 full blocks
        extra = {"session_id": "agent-1", "tool_name": "bash"}
        client.completions.create(model=MODEL, prompt=turn1, max_tokens=4, temperature=0, extra_body=extra)
        for j in range(6):  # 6 x 12 blocks of other requests: more than the pool
            filler = [7 + (j * 1000 + i) % 450 for i in range(190)]
            client.completions.create(model=MODEL, prompt=filler, max_tokens=2, temperature=0)
        before = srv.metrics()[HITS]
        turn2 = turn1 + [11, 12, 13, 14, 15, 16]
        final = {"session_id": "agent-1", "final_turn": True}
        out = client.completions.create(
            model=MODEL, prompt=turn2, max_tokens=4, temperature=0, extra_body=final
        )
        assert out.choices[0].text is not None
        hits = srv.metrics()[HITS] - before
        state = srv.wait_idle()
        assert state["num_free_blocks"] == state["num_blocks"]  # the final turn released the pin
        return hits


def test_session_keeps_its_kv_across_turns_with_continuum(llama_dir: Path) -> None:
    assert program_hits(llama_dir, "continuum") >= 160
    assert program_hits(llama_dir, "sarathi") == 0  # LRU: the other traffic evicted it


def test_bench_serve_drives_programs_in_closed_loop(llama_dir: Path) -> None:
    import asyncio

    from quanta.bench.programs import program_report, run_programs
    from quanta.sim.programs import Program, Turn

    programs = [
        Program(f"p{i}", 0.02 * i, [Turn(64, 4, "bash", 0.05), Turn(10, 4, "bash", 0.05), Turn(8, 3)])
        for i in range(3)
    ]
    with InProcessServer(llama_dir, {"policy": "continuum"}) as srv:
        source, results, wall = asyncio.run(run_programs(srv.url, MODEL, programs, vocab=500))
        hits = srv.metrics()[HITS]
        state = srv.wait_idle()
    rep = program_report(source, results, wall)
    assert rep["completed_programs"] == 3 and rep["failed_calls"] == 0 and rep["calls"] == 9
    for rec in source.records:
        for a, b in zip(rec.turns, rec.turns[1:]):
            assert b.arrival >= a.finished + 0.05 - 1e-6  # the next call waited for the tool
            assert b.prompt_len > a.prompt_len
    assert hits >= 3 * 2 * 64 // 16 * 16  # later calls reuse (at least) the first prompt's full blocks
    assert state["num_free_blocks"] == state["num_blocks"]  # final turns released the pins


def test_an_abandoned_program_s_pin_runs_out_on_an_idle_server(llama_dir: Path) -> None:
    """A call without a final turn keeps its program's KV pinned for the TTL; with no other request
    coming, the idle server still releases it then (nothing stepped to do it before)."""
    import time

    engine_args = {"policy": "continuum", "num_kv_blocks": 48, "policy_args": {"ttl_s": 0.3}}
    with InProcessServer(llama_dir, engine_args) as srv:
        extra = {"session_id": "abandoned", "tool_name": "bash"}
        srv.client().completions.create(model=MODEL, prompt=[5] * 40, max_tokens=2, extra_body=extra)
        deadline = time.monotonic() + 30
        while (state := srv.wait_idle())["num_free_blocks"] != state["num_blocks"]:
            assert time.monotonic() < deadline, "the pin never ran out"
            time.sleep(0.05)
