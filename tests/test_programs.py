"""Agent programs: trace format, closed-loop driver (simulator and real engine), continuum and plas."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import VirtualClock
from quanta.engine.core import EngineCore
from quanta.executor.sim_executor import ConstantStepTime, SimExecutor
from quanta.sim.hardware import get_gpu
from quanta.sim.model_presets import get_model
from quanta.sim.programs import (
    Program,
    ProgramSource,
    Turn,
    drive,
    read_programs,
    synthetic_programs,
    write_programs,
)
from quanta.sim.simulation import SimConfig, simulate


def two_programs() -> list[Program]:
    return [
        Program("a", 0.0, [Turn(40, 5, "bash", 0.3), Turn(12, 4, "edit", 0.7), Turn(9, 3)]),
        Program("b", 0.05, [Turn(30, 6, "bash", 0.2), Turn(20, 2)]),
    ]


def test_trace_round_trip_and_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    write_programs(path, two_programs())
    assert read_programs(path) == two_programs()
    bad = tmp_path / "bad.jsonl"
    for line, message in (
        ({"program_id": "x", "turns": []}, "non-empty"),
        ({"program_id": "x", "turns": [{"new_tokens": 0, "output_tokens": 1}]}, "at least 1"),
        ({"program_id": "x", "turns": [{"new_tokens": 3, "output_tokens": 1, "tool_s": -1}]}, "tool_s"),
        ({"turns": [{"new_tokens": 3, "output_tokens": 1}]}, "program_id"),
    ):
        bad.write_text(json.dumps(line) + "\n")
        with pytest.raises(ValueError, match=message):
            read_programs(bad)
    bad.write_text('{"program_id": "x", "turns": [{"new_tokens": 3, "output_tokens": 1}]}\n' * 2)
    with pytest.raises(ValueError, match="repeats"):
        read_programs(bad)


def null_core(policy: str, num_blocks: int = 256, **policy_args: object) -> EngineCore:
    return EngineCore(
        SimExecutor(ConstantStepTime(0.01), num_blocks, token_id=1),
        VirtualClock(),
        SchedulerConfig(policy, 64, 8, 512, policy_args=dict(policy_args)),
        CacheConfig(block_size=4, num_blocks=num_blocks),
        check_integrity=True,
    )


def test_closed_loop_turns_extend_the_previous_context_after_the_tool_time() -> None:
    source = ProgramSource(two_programs(), exact_lengths=True)
    core = null_core("continuum", ttl_s=5.0)
    seen: dict[str, object] = {}
    core.step_observers.append(
        lambda out: seen.update({s.request.request_id: s.request for s in out.plan.scheduled})
    )
    drive(core, source)
    assert source.done()
    for rec in source.records:
        turns = rec.program.turns
        reqs = [seen[t.request_id] for t in rec.turns]
        for k in range(1, len(turns)):
            prev, cur = reqs[k - 1], reqs[k]
            # prompt = previous prompt + previous output + the new tokens
            assert cur.prompt_token_ids[: prev.num_tokens] == prev.all_token_ids
            assert cur.num_prompt_tokens == prev.num_tokens + turns[k].new_tokens
            assert rec.turns[k].arrival == pytest.approx(rec.turns[k - 1].finished + turns[k - 1].tool_s)
            assert rec.turns[k].cached_tokens == (prev.num_tokens - 1) // 4 * 4  # every computed full block
        assert [r.final_turn for r in reqs] == [False] * (len(reqs) - 1) + [True]
        assert rec.jct == pytest.approx(rec.turns[-1].finished - rec.program.arrival)
    assert not core.kv.pins and core.kv.num_free_blocks == core.kv.num_blocks  # final turns released all


def sim_cfg(policy: str, blocks: int | None = None, **args: object) -> SimConfig:
    return SimConfig(
        get_model("llama-3.1-8b"),
        get_gpu("h100"),
        policy=policy,
        max_model_len=32768,
        max_num_batched_tokens=2048,
        num_kv_blocks=blocks,
        policy_args=dict(args),
        check_integrity=True,
    )


def test_simulated_continuum_keeps_kv_across_tool_calls_under_pressure() -> None:
    progs = synthetic_programs("swe", 16, rate=2.0, seed=3)
    out = {}
    for policy in ("sarathi", "continuum"):
        source = ProgramSource(progs)
        res = simulate(source, sim_cfg(policy, blocks=4000))  # 64k tokens: tight for 16 SWE-like programs
        assert source.done()
        later = [t for r in source.records for t in r.turns[1:]]
        out[policy] = (
            sum(t.cached_tokens for t in later) / sum(t.prompt_len for t in later),
            statistics.mean(r.jct for r in source.records),
            res,
        )
        kv = res.cores[0].kv
        assert kv.num_pinned_blocks <= kv.max_pinned_blocks
        kv.expire_pins(float("inf"))
        assert kv.num_free_blocks == kv.num_blocks  # nothing leaked
    assert out["continuum"][0] > out["sarathi"][0] + 0.1
    assert out["continuum"][1] < out["sarathi"][1]
    pins = out["continuum"][2].pinned_kv[0]
    assert max(f for _, f in pins) > 0 and all(f <= 0.5 for _, f in pins)  # the default cap: half the pool


def test_plas_serves_short_programs_before_long_ones() -> None:
    # Four sequence slots: long programs (8 calls of 30 output tokens) hold them while short ones (2
    # calls) arrive. FCFS queues each short call behind the long programs' next calls; PLAS ranks it by
    # its program's small attained service.
    longs = [Program(f"L{i}", 0.0, [Turn(20, 30, "t", 0.02)] * 8, "long") for i in range(6)]
    shorts = [Program(f"S{i}", 0.5 + 0.25 * i, [Turn(10, 5, "t", 0.02)] * 2, "short") for i in range(12)]
    jct = {}
    for policy in ("sarathi", "plas"):
        source = ProgramSource(longs + shorts, exact_lengths=True)
        core = EngineCore(
            SimExecutor(ConstantStepTime(0.01), 512, token_id=1),
            VirtualClock(),
            SchedulerConfig(policy, 64, 4, 512, policy_args={"quantum_s": 0.2} if policy == "plas" else {}),
            CacheConfig(block_size=4, num_blocks=512),
            check_integrity=True,
        )
        drive(core, source)
        jct[policy] = {
            g: statistics.mean(r.jct for r in source.records if r.program.group == g)
            for g in ("short", "long")
        }
    assert jct["plas"]["short"] < 0.5 * jct["sarathi"]["short"]
    assert jct["plas"]["long"] < 1.5 * jct["sarathi"]["long"]  # delayed, not starved


def test_policy_options_are_validated() -> None:
    for policy, args in (("continuum", {"pin_cap": 2}), ("continuum", {"ttl_s": -1}), ("plas", {"base": 1})):
        with pytest.raises(ValueError):
            null_core(policy, **args)


def test_real_engine_replay_hits_the_cache_with_pins_and_matches_outputs_without(llama_dir: Path) -> None:
    from quanta.engine.llm_engine import EngineArgs, LLMEngine

    programs = [
        Program(
            f"r{i}",
            0.01 * i,
            [Turn(400, 4, "t", 0.0), Turn(6, 4, "t", 0.0), Turn(5, 4, "t", 0.3), Turn(4, 3)],
        )
        for i in range(3)
    ]
    outputs: dict[str, dict[str, list[int]]] = {}
    for policy, args in (("sarathi", {}), ("continuum", {"ttl_s": 0.15})):
        engine = LLMEngine(
            EngineArgs(
                model=str(llama_dir),
                policy=policy,
                policy_args=args,
                num_kv_blocks=200,
                block_size=8,
                max_model_len=512,
                cpu_kernels=False,
                check_integrity=True,  # check_integrity() after every step
            )
        )
        core = engine.core
        source = ProgramSource(programs, exact_lengths=True, vocab=(3, 500), start=core.clock.now())
        done: dict[str, list[int]] = {}
        pinned_after: list[int] = []
        for _ in range(10_000):  # the driver's loop, step by step, to watch each step
            if not (source.has_pending() or core.has_unfinished()):
                break
            while source.next_arrival_time() <= core.clock.now():
                core.add_request(source.pop())
            if not core.has_unfinished():
                core.clock.wait_until(source.next_arrival_time())
                continue
            out = core.step()
            for r in out.updated:
                if r.finished:
                    done[r.request_id] = list(r.output_token_ids)
                    source.on_finished(r, out.end)
            pinned_after.append(core.kv.num_pinned_blocks)
        assert source.done()
        outputs[policy] = done
        later = [t for rec in source.records for t in rec.turns[1:]]
        if policy == "continuum":
            assert all(t.cached_tokens >= 0.95 * t.prompt_len for t in later)
            assert max(pinned_after) > 0
            # The third turn's tool runs 0.3 s, past the 0.15 s TTL: those pins expired (blocks back).
            assert core.kv.num_pins_expired >= 1
        assert not core.kv.pins and core.kv.num_free_blocks == core.kv.num_blocks
    assert outputs["continuum"] == outputs["sarathi"]


def test_agent_trajectory_converter(tmp_path: Path) -> None:
    from quanta.sim.agent_traces import convert, main

    def call(name: str, secs: float) -> dict:
        return {"function": {"name": name, "arguments": '{"command": "ls"}'}, "execution_time_seconds": secs}

    messages = [
        {"role": "system", "content": "s" * 400},
        {"role": "user", "content": [{"type": "text", "text": "u" * 800}]},
        {"role": "assistant", "content": "a" * 40, "tool_calls": [call("bash", 0.5)]},
        {"role": "tool", "content": [{"type": "text", "text": "o" * 120}]},
        {"role": "assistant", "content": "b" * 80, "tool_calls": [call("edit", 0.25), call("bash", 0.25)]},
        {"role": "tool", "content": "p" * 40},
        {"role": "assistant", "content": "done"},
    ]
    path = tmp_path / "traj.json"
    path.write_text(json.dumps([{"traj_id": "t1", "messages": json.dumps(messages)}, {"messages": messages}]))
    programs = convert(path)
    assert [p.program_id for p in programs] == ["t1", "traj1"]
    turns = programs[0].turns
    assert [t.new_tokens for t in turns] == [300, 30, 10]  # 4 characters a token
    assert [t.tool for t in turns] == ["bash", "edit", None]
    assert [t.tool_s for t in turns] == [0.5, 0.5, 0.0]
    assert turns[0].output_tokens == (40 + len('bash{"command": "ls"}') + 3) // 4
    out = tmp_path / "programs.jsonl"
    assert main([str(path), str(out)]) == 0
    source = ProgramSource(read_programs(out))
    core = null_core("continuum")
    core.executor.output_lengths = source.output_lengths  # type: ignore[attr-defined]
    drive(core, source)
    assert source.done()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"nothing": 1}]))
    assert main([str(bad), str(out)]) == 2


def test_cli_simulate_programs(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    out = tmp_path / "r.json"
    res = run_cli(
        "simulate", "--programs", "bfcl", "--num-requests", "12", "--qps", "4", "--policy", "sarathi,continuum",
        "--max-model-len", "16384", "--json", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["sarathi", "continuum"]
    assert all(r["programs"] == 12 and r["jct_mean"] > 0 for r in rows)
    assert "jct_mean" in res.stdout and "prefix hit rate" in res.stdout
    bad = run_cli("simulate", "--programs", str(tmp_path / "missing.jsonl"))
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    bad = run_cli("simulate", "--programs", "bfcl", "--duration", "5")  # a trace's window: not for programs
    assert bad.returncode == 2 and "--duration" in bad.stderr


@pytest.mark.parametrize("policy", ["continuum", "plas"])
def test_decode_runs_keep_program_schedules_exact(policy: str) -> None:
    """Runs of decode steps planned at once give the step-by-step schedule, pins and closed loop included."""
    progs = synthetic_programs("swe", 10, rate=2.0, seed=4)
    outs = []
    for runs in (True, False):
        source = ProgramSource(progs)
        cfg = sim_cfg(policy, blocks=3000)
        cfg.decode_runs, cfg.check_integrity = runs, False
        res = simulate(source, cfg)
        assert (res.num_decode_runs > 0) == runs
        outs.append(
            [(t.arrival, t.first_token, t.finished, t.cached_tokens) for r in source.records for t in r.turns]
        )
    assert outs[0] == outs[1]


def test_plas_a_call_the_starvation_guard_promotes_is_not_preempted_by_level_0_calls() -> None:
    """Program A has about 1.5 s of service (level 1); its next call waits behind a stream of new
    one-call programs (level 0) on one sequence slot. The guard admits it after 8 x 1.5 s; it must then
    run (as level 0), not be preempted by the next level-0 call at every step (recompute: one token per
    admission, 99 preemptions, and the thrash booked as A's service)."""
    from quanta.engine.arrivals import run_arrivals
    from quanta.request import Request
    from quanta.sampling_params import SamplingParams

    core = EngineCore(
        SimExecutor(ConstantStepTime(0.01), 256, token_id=1),
        VirtualClock(),
        SchedulerConfig("plas", 64, 1, 512, policy_args={"preemptive": True}),
        CacheConfig(block_size=4, num_blocks=256),
        check_integrity=True,
    )

    def call(rid: str, start: int, out: int, arrival: float, program: str, final: bool = False) -> Request:
        params = SamplingParams(max_tokens=out, ignore_eos=True)
        return Request(rid, list(range(start, start + 16)), params, arrival_time=arrival, program_id=program, final_turn=final)  # fmt: skip

    reqs = [call("A1", 1000, 150, 0.0, "A"), call("A2", 1100, 100, 2.0, "A")]
    reqs += [call(f"P{i}", 2000 + 20 * i, 30, 1.9 + 0.2 * i, f"P{i}", final=True) for i in range(120)]
    run_arrivals(core, reqs)
    a2 = reqs[1]
    assert a2.times.first_scheduled is not None and a2.times.first_scheduled > 10  # starved, then promoted
    assert a2.num_preemptions == 0 and a2.times.finished - a2.times.first_scheduled < 1.5
