"""KV pins: a finished call's KV held for its program across a tool call (KVCacheManager + Scheduler)."""

from __future__ import annotations

import math

import pytest
from tests.helpers import run_to_end

from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import VirtualClock
from quanta.engine.core import EngineCore
from quanta.executor.sim_executor import ConstantStepTime, SimExecutor
from quanta.kv import KVCacheManager
from quanta.request import Request, RequestStatus
from quanta.sampling_params import SamplingParams


def call(
    rid: str, tokens: list[int], program: str | None = "p", final: bool = False, arrival: float = 0.0
) -> Request:
    return Request(
        rid,
        tokens,
        SamplingParams(max_tokens=2, ignore_eos=True),
        arrival_time=arrival,
        program_id=program,
        final_turn=final,
    )


def computed(kv: KVCacheManager, r: Request) -> None:
    """Allocate and 'compute' the whole prompt, then finish the request (its KV still held)."""
    assert kv.allocate_slots(r, r.num_tokens)
    r.num_computed_tokens = r.num_tokens
    r.status = RequestStatus.FINISHED_STOPPED


def test_pinned_blocks_survive_eviction_and_expire_back_to_lru_with_hashes() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = call("a", list(range(12)))  # 3 full blocks
    computed(kv, a)
    assert kv.pin(a, expires_at=5.0) == 3
    kv.free(a)
    assert kv.num_free_blocks == 3 and kv.num_pinned_blocks == 3
    kv.check_integrity()
    # Another request takes every free block: with the pin, a's blocks are not among them.
    b = call("b", list(range(100, 112)), program=None)
    assert kv.allocate_slots(b, 12)
    assert not kv.allocate_slots(call("c", [7] * 4, program=None), 4)  # pinned blocks are not free
    kv.check_integrity()
    assert kv.expire_pins(4.9) == 0
    assert kv.expire_pins(5.0) == 1
    assert kv.num_pinned_blocks == 0 and kv.num_free_blocks == 3
    kv.check_integrity()
    # Expired, but the blocks keep their hashes: the program's next call still hits them.
    nxt = call("a2", list(range(12)) + [50, 51, 52])
    assert len(kv.get_computed_blocks(nxt)) == 3


def test_unpinned_lru_blocks_are_evicted_by_the_same_pressure() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = call("a", list(range(12)))
    computed(kv, a)
    kv.free(a)
    b = call("b", list(range(100, 124)), program=None)
    assert kv.allocate_slots(b, 24)  # takes all six, a's cached ones included
    assert kv.get_computed_blocks(call("a2", list(range(12)) + [1])) == []


def test_caps_bound_pinned_kv() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=4)
    kv.max_blocks_per_pin, kv.max_pinned_blocks = 2, 3
    a = call("a", list(range(16)), program="pa")
    b = call("b", list(range(100, 116)), program="pb")
    for r in (a, b):
        computed(kv, r)
    assert kv.pin(a, 1.0) == 2  # the per-program cap
    assert kv.pin(b, 1.0) == 1  # what the global cap leaves
    for r in (a, b):
        kv.free(r)
    assert kv.num_pinned_blocks == 3
    kv.check_integrity()


def test_pressure_drops_the_latest_program_first_and_unpin_releases() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=4)
    reqs = [call(f"r{i}", list(range(100 * i, 100 * i + 8)), program=f"p{i}") for i in range(3)]
    for rank, r in zip((2.0, 0.0, 1.0), reqs):
        computed(kv, r)
        kv.pin(r, math.inf, rank=rank)
        kv.free(r)
    assert kv.drop_pin()
    assert set(kv.pins) == {"p1", "p2"}  # p0 arrived latest (rank 2)
    assert kv.drop_pin(keep="p2")
    assert set(kv.pins) == {"p2"}
    # p2's own pin goes last, and only where it holds blocks its call will not take as prefix hits
    # (releasing those would free nothing for it).
    hits = [kv.pool.blocks[i] for i in kv.pins["p2"].blocks]
    assert not kv.drop_pin(keep="p2", reused=hits)
    assert kv.drop_pin(keep="p2", reused=hits[:1])
    assert not kv.pins and kv.num_free_blocks == 20
    assert not kv.drop_pin()
    kv.check_integrity()


def engine(policy: str, num_blocks: int, **policy_args: object) -> EngineCore:
    return EngineCore(
        SimExecutor(ConstantStepTime(0.01), num_blocks, token_id=1),
        VirtualClock(),
        SchedulerConfig(policy, 64, 8, 64, policy_args=dict(policy_args)),
        CacheConfig(block_size=4, num_blocks=num_blocks),
        check_integrity=True,
    )


def test_scheduler_pins_finished_call_and_next_turn_consumes_it() -> None:
    core = engine("continuum", 64, ttl_s=1.0)
    first = call("t0", list(range(20)))
    core.add_request(first)
    run_to_end(core)
    kv = core.kv
    assert kv.has_pin("p") and kv.num_pinned_blocks == 5  # 20 prompt tokens + 1 computed output: 5 blocks
    nxt = call("t1", first.all_token_ids + [90, 91, 92], arrival=core.clock.now())
    core.add_request(nxt)
    core.step()
    assert nxt.num_cached_tokens == 20 and not kv.has_pin("p")  # consumed on admission
    run_to_end(core)
    assert kv.has_pin("p")  # pinned again, for the next tool call
    final = call("t2", nxt.all_token_ids + [93], final=True, arrival=core.clock.now())
    core.add_request(final)
    run_to_end(core)
    assert not kv.pins and kv.num_free_blocks == kv.num_blocks  # the final turn released everything


def test_pins_expire_at_their_ttl_in_the_step_loop() -> None:
    core = engine("continuum", 64, ttl_s=0.05)
    core.add_request(call("t0", list(range(20))))
    run_to_end(core)
    end = core.clock.now()
    core.add_request(call("other", list(range(500, 504)), program=None, arrival=end))
    while core.has_unfinished():
        core.step()
    assert core.kv.has_pin("p")  # 3 steps of 0.01 s: not yet
    core.clock.wait_until(end + 0.05)
    core.add_request(call("other2", list(range(600, 604)), program=None, arrival=core.clock.now()))
    core.step()
    assert not core.kv.pins and core.kv.num_pins_expired == 1


def test_running_request_short_of_kv_drops_pins_before_any_preemption() -> None:
    core = engine("continuum", 16, ttl_s=100.0, pin_cap=1.0, pin_cap_per_program=1.0)
    core.add_request(call("t0", list(range(24))))  # 24 + 1 computed tokens: 6 full blocks pinned
    run_to_end(core)
    assert core.kv.num_pinned_blocks == 6
    big = Request(
        "big",
        list(range(300, 340)),
        SamplingParams(max_tokens=20, ignore_eos=True),
        arrival_time=core.clock.now(),
    )
    core.add_request(big)  # 40 + 20 tokens need 15 blocks: only 10 are free
    run_to_end(core)
    assert big.num_preemptions == 0 and core.scheduler.num_preemptions == 0
    assert not core.kv.pins and core.kv.num_pins_dropped == 1


def test_waiting_call_behind_pins_is_admitted_once_nothing_runs() -> None:
    # Nothing running would ever free memory: pins give way at once (no tail-guard wait, no stall).
    core = engine("continuum", 16, ttl_s=100.0, tail_guard_s=1e9, pin_cap=1.0, pin_cap_per_program=1.0)
    core.add_request(call("t0", list(range(24))))
    run_to_end(core)
    core.add_request(call("x", list(range(300, 340)), program="q", arrival=core.clock.now()))
    steps = run_to_end(core, max_steps=100)
    assert steps > 0 and not core.kv.has_pin("p")


@pytest.mark.parametrize("policy", ["sarathi", "plas"])
def test_policies_without_pins_free_calls_to_the_lru_list(policy: str) -> None:
    core = engine(policy, 64)
    core.add_request(call("t0", list(range(20))))
    run_to_end(core)
    assert not core.kv.pins and core.kv.num_free_blocks == 64


def test_aborted_call_releases_its_program_pin() -> None:
    core = engine("continuum", 64, ttl_s=10.0)
    core.add_request(call("t0", list(range(20))))
    run_to_end(core)
    nxt = call("t1", list(range(20)) + [1, 2, 3, 4, 5, 6], arrival=core.clock.now())
    core.add_request(nxt)
    core.abort_requests(["t1"])
    assert not core.kv.pins and core.kv.num_free_blocks == 64


def test_pin_of_a_program_whose_next_call_waits_does_not_expire() -> None:
    core = engine("continuum", 64, ttl_s=0.05, pin_cap=1.0, pin_cap_per_program=1.0)
    core.add_request(call("t0", list(range(20))))
    run_to_end(core)
    blocker = Request(
        "big", list(range(300, 340)), SamplingParams(max_tokens=30, ignore_eos=True), core.clock.now()
    )
    core.add_request(blocker)
    core.step()
    # The next call arrives within the TTL but cannot run yet (one sequence slot left, taken below).
    core.scheduler.config.max_num_seqs = 1
    nxt = call("t1", list(range(20)) + [1, 2, 3, 4, 5], arrival=core.clock.now())
    core.add_request(nxt)
    for _ in range(10):  # 0.1 s: twice the TTL
        core.step()
    assert nxt.status == RequestStatus.WAITING and core.kv.has_pin("p")
    run_to_end(core)
    assert nxt.num_cached_tokens == 20


def test_a_call_arriving_after_the_ttl_on_an_idle_engine_finds_the_pin_expired() -> None:
    core = engine("continuum", 64, ttl_s=0.05)
    first = call("t0", list(range(20)))
    core.add_request(first)
    run_to_end(core)  # nothing runs from here: no step would expire the pin
    core.clock.wait_until(core.clock.now() + 0.2)
    core.add_request(call("t1", first.all_token_ids + [7], arrival=core.clock.now()))
    assert not core.kv.pins and core.kv.num_pins_expired == 1
    run_to_end(core)


def test_an_idle_engine_releases_expired_pins_by_itself() -> None:
    """Nothing steps an idle engine, yet its pins run out: the engine loop waits until the next expiry
    (idle_wait) and releases them (on_idle), so an idle server shows its whole pool free."""
    core = engine("continuum", 64, ttl_s=0.05)
    core.add_request(call("t0", list(range(20))))
    run_to_end(core)
    assert core.kv.has_pin("p") and core.idle_wait() == pytest.approx(0.05)
    core.on_idle()
    assert core.kv.has_pin("p")  # not yet
    core.clock.wait_until(core.clock.now() + 0.05)
    assert core.idle_wait() == 0.0
    core.on_idle()
    assert not core.kv.pins and core.kv.num_free_blocks == core.kv.num_blocks and core.idle_wait() is None


def test_per_program_state_is_bounded() -> None:
    """Every session id a client sends is a program: what policies keep per program forgets the oldest
    beyond MAX_PROGRAMS, and per tool name beyond _MAX_TOOLS (clients name tools at will)."""
    from quanta.sched.bounded import RecentDict
    from quanta.sched.policies import continuum

    core = engine("continuum", 64, ttl_s=0.0)
    policy = core.policy
    assert isinstance(policy.first_arrival, RecentDict)
    policy.first_arrival.maxlen = policy._last_end.maxlen = 5
    for i in range(40):
        req = call(f"c{i}", [i + 3, 7, 9], program=f"prog{i}", arrival=core.clock.now())
        req.tool_name = f"tool{i}"
        core.add_request(req)
        run_to_end(core)
    assert len(policy.first_arrival) <= 5 and len(policy._last_end) <= 5
    for i in range(continuum._MAX_TOOLS + 50):
        policy._observe(f"tool-{i}", 0.1)
    assert len(policy.durations) <= continuum._MAX_TOOLS + 2  # the capped tools, and all tools together
