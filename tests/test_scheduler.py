"""The scheduler alone (constant-time SimExecutor, virtual clock): each policy follows its spec."""

from __future__ import annotations

import pytest

from helpers import STEP_TIME, make_request, null_engine, run_to_end
from quanta.config import SchedulerConfig
from quanta.request import RequestStatus
from quanta.sched import make_policy


def decoding_ids(core) -> set[str]:
    return {r.request_id for r in core.scheduler.running if r.num_tokens_to_compute == 1}


def test_sarathi_respects_budget_and_never_skips_a_decode() -> None:
    core = null_engine("sarathi", budget=32, num_blocks=512)
    for i in range(12):
        core.add_request(make_request(f"r{i}", prompt_len=20 + 13 * i, max_tokens=10 + i, arrival=0.0))
    saw_mixed = False
    while core.has_unfinished():
        before = decoding_ids(core)
        out = core.step()
        plan = out.plan
        assert plan.num_batched_tokens <= 32
        assert sum(s.num_new_tokens for s in plan.scheduled) == plan.num_batched_tokens
        scheduled = {s.request_id for s in plan.scheduled}
        assert before <= scheduled, "a running decode was left out of a step"
        decodes = [s for s in plan.scheduled if s.request_id in before]
        prefills = [s for s in plan.scheduled if s.request_id not in before]
        if decodes and prefills:
            saw_mixed = True
            # Decodes come first, then prefill chunks.
            assert plan.scheduled.index(decodes[-1]) < plan.scheduled.index(prefills[0])
    assert saw_mixed, "decodes and prefill chunks never shared a step"
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_sarathi_chunks_long_prompts() -> None:
    core = null_engine("sarathi", budget=16, num_blocks=512)
    core.add_request(make_request("long", prompt_len=100, max_tokens=2))
    out = core.step()
    assert [(s.num_computed_tokens, s.num_new_tokens, s.sample) for s in out.plan.scheduled] == [
        (0, 16, False)
    ]
    chunks = [out.plan.scheduled[0].num_new_tokens]
    while core.has_unfinished():
        chunks.append(core.step().plan.scheduled[0].num_new_tokens)
    assert chunks == [16] * 6 + [4, 1]


def test_prefill_first_stalls_decodes_while_prompts_run() -> None:
    core = null_engine("prefill-first", budget=512, num_blocks=512)
    core.add_request(make_request("a", prompt_len=50, max_tokens=20))
    core.step()  # a's prompt
    core.step()  # a decodes
    core.add_request(make_request("b", prompt_len=300, max_tokens=5, first_token=1000))
    before = decoding_ids(core)
    assert before == {"a"}
    out = core.step()
    # The whole prompt of b runs in one step, and a's decode waits.
    assert [(s.request_id, s.num_new_tokens) for s in out.plan.scheduled] == [("b", 300)]
    out = core.step()
    assert {s.request_id for s in out.plan.scheduled} == {"a", "b"}
    run_to_end(core)


def test_sarathi_keeps_decoding_during_a_long_prompt() -> None:
    core = null_engine("sarathi", budget=64, num_blocks=512)
    core.add_request(make_request("a", prompt_len=50, max_tokens=30))
    core.step()
    core.add_request(make_request("b", prompt_len=300, max_tokens=5, first_token=1000))
    a_tokens = []
    for _ in range(6):
        core.step()
        a_tokens.append(core.scheduler.requests["a"].num_output_tokens)
    assert a_tokens == [2, 3, 4, 5, 6, 7]  # one token per step while b's prompt is chunked


def test_prefill_first_requires_budget_for_whole_prompts() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_policy("prefill-first", SchedulerConfig("prefill-first", 64, 8, 512))


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope", SchedulerConfig())


@pytest.mark.parametrize("policy,budget", [("sarathi", 48), ("prefill-first", 512)])
def test_preemption_by_recompute_finishes_everything(policy: str, budget: int) -> None:
    # 40 blocks of 4 tokens: far less than the requests need together.
    core = null_engine(policy, budget=budget, num_blocks=40, block_size=4, max_model_len=128)
    reqs = [make_request(f"r{i}", prompt_len=30 + i, max_tokens=40, first_token=100 * i) for i in range(8)]
    for r in reqs:
        core.add_request(r)
    run_to_end(core)
    assert core.scheduler.num_preemptions > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 40 for r in reqs)
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_preempted_request_keeps_its_place_in_line() -> None:
    core = null_engine("sarathi", budget=64, num_blocks=24, block_size=4, max_model_len=64)
    for i in range(4):
        core.add_request(
            make_request(f"r{i}", prompt_len=20, max_tokens=30, arrival=float(i), first_token=50 * i)
        )
    preempted_order = []
    while core.has_unfinished():
        out = core.step()
        if out.plan.preempted_ids:
            preempted_order.extend(out.plan.preempted_ids)
            waiting = [r.request_id for r in core.scheduler.waiting]
            # Waiting requests stay in arrival order, preempted ones included.
            assert waiting == sorted(waiting, key=lambda rid: core.scheduler.requests[rid].arrival_time)
    assert preempted_order


def test_running_cap_and_admission_order() -> None:
    core = null_engine("sarathi", budget=512, num_blocks=512, max_num_seqs=3)
    for i in range(6):
        core.add_request(make_request(f"r{i}", prompt_len=5, max_tokens=3, arrival=float(i)))
    out = core.step()
    assert [s.request_id for s in out.plan.scheduled] == ["r0", "r1", "r2"]
    run_to_end(core)


def test_abort_frees_blocks_immediately() -> None:
    core = null_engine("sarathi", budget=64, num_blocks=64, max_model_len=256)
    core.add_request(make_request("a", prompt_len=40, max_tokens=100))
    core.add_request(make_request("b", prompt_len=40, max_tokens=100))
    core.step()
    core.abort_requests(["a", "b", "unknown"])
    assert not core.has_unfinished()
    core.scheduler.check_integrity()
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_prompt_longer_than_context_is_rejected() -> None:
    core = null_engine(max_model_len=64)
    with pytest.raises(ValueError, match="longer than the context"):
        core.add_request(make_request("a", prompt_len=64, max_tokens=1))
    assert not core.has_unfinished()


def test_requests_stop_at_context_length() -> None:
    core = null_engine(max_model_len=32)
    r = make_request("a", prompt_len=30, max_tokens=100)
    core.add_request(r)
    run_to_end(core)
    assert r.num_tokens == 32 and r.status == RequestStatus.FINISHED_LENGTH


def test_timestamps_come_from_the_clock() -> None:
    core = null_engine(budget=8)
    r = make_request("a", prompt_len=20, max_tokens=3, arrival=0.0)
    core.add_request(r)
    run_to_end(core)
    step = STEP_TIME
    assert r.times.first_scheduled == 0.0
    assert r.times.first_token == pytest.approx(3 * step)  # 8 + 8 + 4 prompt tokens
    assert r.times.tokens == pytest.approx([3 * step, 4 * step, 5 * step])
    assert r.times.finished == pytest.approx(5 * step)


def test_requests_with_the_same_prompt_share_blocks_in_the_same_step() -> None:
    core = null_engine(budget=512, num_blocks=64, block_size=4, max_model_len=256)
    for i in range(3):
        core.add_request(make_request(f"s{i}", prompt_len=18, max_tokens=2))
    out = core.step()
    first = core.kv.block_ids("s0")
    for i in (1, 2):
        assert core.kv.block_ids(f"s{i}")[:4] == first[:4]
    assert [core.kv.pool.blocks[b].ref_cnt for b in first[:4]] == [3] * 4
    # Only the tokens past the shared full blocks were computed again.
    assert [s.num_new_tokens for s in out.plan.scheduled] == [18, 2, 2]
    run_to_end(core)


def test_scheduling_code_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, quanta, quanta.sched, quanta.kv, quanta.engine.core, quanta.executor.sim_executor, quanta.sim.cost_model, quanta.sim.model_presets, "
        "quanta.model.config; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_schedules_are_deterministic() -> None:
    def plans() -> list[tuple]:
        core = null_engine("sarathi", budget=40, num_blocks=60, block_size=4, max_model_len=128)
        for i in range(10):
            core.add_request(
                make_request(
                    f"r{i}", prompt_len=10 + 7 * i, max_tokens=15, arrival=i * 0.01, first_token=40 * i
                )
            )
        run_to_end(core)
        return [p.summary() for p in core.executor.plans]

    first = plans()
    assert first == plans()
    assert any(preempted for _, preempted in first), "the small pool should preempt"


def test_a_failed_step_aborts_its_requests_and_poisons_no_cache() -> None:
    core = null_engine("sarathi", budget=64, num_blocks=64, block_size=4, max_model_len=128)
    core.add_request(make_request("a", prompt_len=20, max_tokens=5, first_token=0))
    run_to_end(core)  # a's blocks are now cached
    original = core.executor.execute

    def broken(plan):
        raise RuntimeError("device lost")

    core.executor.execute = broken
    core.add_request(make_request("b", prompt_len=30, max_tokens=5, first_token=500))
    with pytest.raises(RuntimeError, match="device lost"):
        core.step()
    b_prefix = make_request("probe", prompt_len=30, max_tokens=1, first_token=500)
    assert core.kv.get_computed_blocks(b_prefix) == []  # b's KV was never written
    assert (
        len(core.kv.get_computed_blocks(make_request("probe2", prompt_len=20, max_tokens=1, first_token=0)))
        == 4
    )
    assert not core.has_unfinished()
    core.scheduler.check_integrity()
    assert core.kv.num_free_blocks == core.kv.num_blocks
    core.executor.execute = original
    core.add_request(make_request("c", prompt_len=10, max_tokens=3))
    run_to_end(core)  # the engine goes on serving
