"""Runs of steps planned at once (Scheduler.decode_run: pure decodes, maybe beside one prompt's chunks)
change nothing: the same workloads with and without them give every request the same timestamps, to the
last bit."""

from __future__ import annotations

import numpy as np
import pytest

from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import VirtualClock
from quanta.engine.core import EngineCore
from quanta.executor.sim_executor import ConstantStepTime, SimExecutor
from quanta.kv.manager import KVCacheManager
from quanta.request import Request
from quanta.sampling_params import SamplingParams
from quanta.sim.hardware import get_gpu
from quanta.sim.model_presets import get_model
from quanta.sim.simulation import SimConfig, SimResult, simulate
from quanta.sim.workload import WorkloadRequest


def mixed_workload(n: int, seed: int) -> list[WorkloadRequest]:
    """Bursts and lulls, shared system prompts, multi-turn sessions, priorities, tenants, SLO classes."""
    rng = np.random.default_rng(seed)
    gaps = rng.choice([0.0, 0.02, 0.5, 3.0], size=n, p=[0.3, 0.4, 0.2, 0.1])
    out = []
    for i, t in enumerate(np.cumsum(gaps)):
        prompt = int(rng.integers(20, 1500))
        kind = i % 4
        out.append(
            WorkloadRequest(
                float(t),
                prompt,
                int(rng.integers(1, 300)),
                tenant=("a", "b", "c")[i % 3],
                priority=int(rng.integers(0, 3)),
                session_id=f"s{i % 7}" if kind == 1 else None,
                slo_class=("interactive", "batch")[i % 2],
                max_tokens=int(rng.integers(5, 120)) if kind == 2 else None,
                prefix_group=f"g{i % 2}" if kind == 3 else None,
                prefix_len=min(prompt, 256) if kind == 3 else 0,
            )
        )
    return out


def timeline(res: SimResult) -> list[tuple]:
    return [
        (
            r.request_id,
            r.status,
            r.num_output_tokens,
            r.num_cached_tokens,
            r.num_preemptions,
            r.times.first_scheduled,
            r.times.first_token,
            r.times.finished,
            tuple(r.times.tokens),
        )
        for r in res.requests
    ]


def small_pool_config(policy: str, replicas: int, blocks: int, mode: str, groups: bool, **kw: object) -> SimConfig:
    """Mistral-7B replicas on A100s with `blocks` KV blocks each (few: preemptions), preempting by `mode`
    (1 GB of swap space for "swap"), every step's KV and scheduler invariants checked."""
    return SimConfig(
        get_model("mistral-7b"),
        get_gpu("a100-80gb"),
        policy=policy,
        replicas=replicas,
        num_kv_blocks=blocks,
        max_model_len=4096,
        preemption_mode=mode,
        swap_space_gb=1.0 if mode == "swap" else 0.0,
        block_groups=groups,
        check_integrity=True,
        **kw,  # type: ignore[arg-type]
    )


CASES = [
    # policy, replicas, KV blocks per replica (small: preemptions), preemption mode, block groups
    ("sarathi", 1, 400, "recompute", True),
    ("sarathi", 3, 600, "swap", False),
    ("wfq", 2, 400, "recompute", False),
    ("prefill-first", 1, 700, "recompute", True),
    ("priority", 2, 400, "recompute", True),
    ("vtc", 2, 500, "recompute", True),  # per-step counters: runs are blocked, still identical
    ("deadline", 2, 500, "recompute", True),
    ("plas", 1, 400, "swap", True),
    ("batch", 2, 500, "recompute", False),
]


@pytest.mark.parametrize(("policy", "replicas", "blocks", "mode", "groups"), CASES)
def test_decode_runs_give_identical_timestamps(
    policy: str, replicas: int, blocks: int, mode: str, groups: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = mixed_workload(160, seed=replicas + blocks)
    chunk_runs: list[int] = []  # runs that computed a prompt's chunks beside the decodes
    plan_run = EngineCore.decode_run

    def spy(self: EngineCore, limit: int) -> object:
        run = plan_run(self, limit)
        chunk_runs.extend([1] if run is not None and run.chunks else [])
        return run

    monkeypatch.setattr(EngineCore, "decode_run", spy)

    def run(decode_runs: bool) -> SimResult:
        return simulate(w, small_pool_config(policy, replicas, blocks, mode, groups, decode_runs=decode_runs))

    steps, runs = run(False), run(True)
    assert timeline(runs) == timeline(steps)
    assert all(r.finished for r in runs.requests)
    assert runs.num_steps == steps.num_steps
    assert runs.peak_kv_usage == steps.peak_kv_usage
    assert runs.swap_stats == steps.swap_stats
    assert runs.summary() == steps.summary()
    assert steps.num_decode_runs == 0
    if policy in ("vtc", "deadline", "wfq"):
        assert runs.num_decode_runs == 0  # they keep per-step accounting and do not opt in
    else:
        assert runs.num_decode_runs > 0
        assert runs.num_steps > 3 * runs.num_decode_runs  # most steps came in runs
    # Prompts longer than the budget ran their chunks in runs, but where prefill goes alone.
    assert (len(chunk_runs) > 0) == (policy in ("sarathi", "priority", "plas", "batch"))
    if blocks <= 400:
        assert steps.num_preemptions > 0
    assert sum(r.num_cached_tokens for r in steps.requests) > 0  # prefix caching in play


def test_a_run_is_cut_by_an_arrival_routed_to_its_replica() -> None:
    # One long request decodes alone; others arrive while it does, at times inside its runs.
    w = [WorkloadRequest(0.0, 100, 2000)] + [WorkloadRequest(0.3 + 0.37 * i, 50 + i, 40) for i in range(12)]
    cfg = dict(policy="sarathi", replicas=2, router="round-robin", max_model_len=4096, check_integrity=True)
    model, gpu = get_model("mistral-7b"), get_gpu("a100-80gb")
    a = simulate(w, SimConfig(model, gpu, decode_runs=False, **cfg))
    b = simulate(w, SimConfig(model, gpu, decode_runs=True, **cfg))
    assert timeline(a) == timeline(b) and b.num_decode_runs > 0


def assert_same_engines(stepped: EngineCore, jumped: EngineCore) -> None:
    """The engine that stepped and the one that applied runs read the same: every running request's
    tokens, computed tokens and timestamps, KV blocks, prefix index, free list (LRU order too), clock
    and step ids."""
    for a, b in zip(stepped.scheduler.running, jumped.scheduler.running, strict=True):
        assert (a.all_token_ids, a.num_computed_tokens, a.times.tokens, a.times.first_token) == (
            b.all_token_ids,
            b.num_computed_tokens,
            b.times.tokens,
            b.times.first_token,
        )
        assert stepped.kv.req_blocks[a.request_id] == jumped.kv.req_blocks[b.request_id]
    assert stepped.kv.pool._cached.keys() == jumped.kv.pool._cached.keys()
    assert list(stepped.kv.pool._free) == list(jumped.kv.pool._free)
    assert stepped.clock.now() == jumped.clock.now() and stepped.num_steps == jumped.num_steps
    assert stepped.scheduler._step_id == jumped.scheduler._step_id


@pytest.mark.parametrize("twins", [False, True])
def test_a_run_applies_what_step_by_step_would(twins: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the engine level: a run of n steps leaves the engine as n step() calls do, KV blocks, prefix
    index and free list included (4-token blocks: a block boundary every few steps). `twins`: the two
    requests share their prompt, so their decodes fill blocks with equal hashes (only the first in step
    order is indexed), and the run offers filled blocks to the index in step order; otherwise once per
    request at the run's end."""
    commute: list[bool] = []
    fills_commute = KVCacheManager._fills_commute

    def spy(self: KVCacheManager, reqs: list[Request], num_steps: int, prompt_done: int | None = None) -> bool:
        commute.append(fills_commute(self, reqs, num_steps, prompt_done))
        return commute[-1]

    monkeypatch.setattr(KVCacheManager, "_fills_commute", spy)

    def engine() -> EngineCore:
        return EngineCore(
            SimExecutor(ConstantStepTime(0.01), num_blocks=30, output_lengths={"r0": 50, "r1": 90}),
            VirtualClock(),
            SchedulerConfig("sarathi", 64, 8, 120),
            CacheConfig(block_size=4, num_blocks=30),
            check_integrity=True,
        )

    cores = [engine(), engine()]
    for core in cores:
        for i, n in enumerate((30, 30) if twins else (9, 30)):
            core.add_request(
                Request(f"r{i}", list(range(3, 3 + n)), SamplingParams(max_tokens=None), 0.0, eos_token_ids=(2,))
            )
    stepped, jumped = cores
    num_runs = 0
    while jumped.has_unfinished():
        run = jumped.decode_run(limit=1000)
        if run is None:  # a step that differs (r0's EOS, a block the pool may not have): both step
            stepped.step()
            jumped.step()
        else:
            num_runs += 1
            for _ in range(len(run)):
                stepped.step()
            jumped.apply_decode_run(run)
        assert_same_engines(stepped, jumped)
    assert not stepped.has_unfinished() and num_runs >= 2
    # Twins fill equal blocks side by side (runs in step order); alone, r1 fills blocks of its own.
    assert (False in commute) == twins and True in commute


def test_decode_run_times() -> None:
    """A run's steps begin at times[k] and end at times[k + 1]; negative k counts from the last step,
    whose start is when the simulator applies the run (its stops must be seen from then on)."""
    from quanta.engine.core import DecodeRun

    run = DecodeRun(7, {}, np.array([1.0, 1.5, 2.25, 3.0]))
    assert len(run) == 3
    assert [run.start(k) for k in (0, 1, 2, -1, -3)] == [1.0, 1.5, 2.25, 2.25, 1.0]
    assert [run.end(k) for k in (0, 2, -1, -3)] == [1.5, 3.0, 3.0, 1.5]
    assert [run.steps_before(t) for t in (1.0, 1.2, 2.25, 2.3, 9.0)] == [0, 1, 2, 3, 3]
    tail = run.tail(2)
    assert len(tail) == 1 and tail.start(0) == 2.25 and tail.end(-1) == 3.0


def test_least_load_sees_a_runs_stops_from_its_last_steps_start() -> None:
    """Many replicas, dense arrivals, a router that reads load: arrivals land between a run's last step
    start and end, where the requests stopping in that step no longer count."""
    rng = np.random.default_rng(3)
    w = [
        WorkloadRequest(float(t), int(rng.integers(20, 400)), int(rng.integers(1, 60)))
        for t in np.cumsum(rng.exponential(0.01, size=400))
    ]
    cfg = dict(policy="sarathi", replicas=6, router="least-load", max_model_len=4096)
    model, gpu = get_model("llama-3.1-8b"), get_gpu("a100-80gb")
    a = simulate(w, SimConfig(model, gpu, decode_runs=False, **cfg))
    b = simulate(w, SimConfig(model, gpu, decode_runs=True, **cfg))
    assert timeline(a) == timeline(b) and b.num_decode_runs > 0


PRIVATE_CASES = [
    # policy, replicas, KV blocks per replica (small: preemptions), preemption mode, block groups, router,
    # migration
    ("sarathi", 1, 300, "recompute", True, "least-load", False),
    ("sarathi", 2, 500, "swap", True, "least-load", False),
    ("priority", 2, 300, "recompute", False, "least-load", False),
    ("sarathi", 3, 300, "recompute", True, "freeness", True),
    ("sarathi", 3, 300, "recompute", True, "prefix", False),
]


@pytest.mark.parametrize(("policy", "replicas", "blocks", "mode", "groups", "router", "migration"), PRIVATE_CASES)
def test_private_prompts_give_identical_runs(
    policy: str, replicas: int, blocks: int, mode: str, groups: bool, router: str, migration: bool
) -> None:
    """A trace whose requests share no prompt block: hashing only what a preempted request may find again
    (SimConfig.private_prompts) leaves every timestamp, prefix hit, swap and migration as hashing every
    block does, preempted requests finding their own blocks again included."""
    w = [
        WorkloadRequest(r.arrival, r.prompt_len, r.output_len, tenant=r.tenant, priority=r.priority)
        for r in mixed_workload(160, seed=blocks)
    ]

    def run(private: bool) -> SimResult:
        cfg = small_pool_config(
            policy, replicas, blocks, mode, groups, router=router, migration=migration, private_prompts=private
        )
        return simulate(w, cfg)

    hashed, private = run(False), run(True)
    assert all(c.kv.private_prompts for c in private.cores) and not hashed.cores[0].kv.private_prompts
    assert timeline(private) == timeline(hashed)
    assert private.summary() == hashed.summary()
    assert (private.num_steps, private.num_decode_runs, private.swap_stats, private.peak_kv_usage) == (
        hashed.num_steps,
        hashed.num_decode_runs,
        hashed.swap_stats,
        hashed.peak_kv_usage,
    )
    assert (private.prefix_cache_queries, private.prefix_cache_hits) == (
        hashed.prefix_cache_queries,
        hashed.prefix_cache_hits,
    )
    assert [(m.request_id, m.src, m.dst, m.committed) for m in private.migrations] == [
        (m.request_id, m.src, m.dst, m.committed) for m in hashed.migrations
    ]
    for a, b in zip(private.cores, hashed.cores, strict=True):  # the same blocks, free in the same order
        assert list(a.kv.pool._free) == list(b.kv.pool._free)
        assert {i for i, x in enumerate(a.kv.pool.blocks) if x.block_hash is not None} == {
            i for i, x in enumerate(b.kv.pool.blocks) if x.block_hash is not None
        }
    assert hashed.num_preemptions > 0
    # Preempted requests found their own blocks again (recompute) or on the device (swap).
    assert private.prefix_cache_hits > 0 or private.swap_stats["swap_ins"] > 0
    if migration:
        assert private.num_migrations > 0


def test_private_prompts_only_for_unshared_traces() -> None:
    """Prefix groups or sessions share prompt blocks: such a trace is hashed in full."""
    model, gpu = get_model("mistral-7b"), get_gpu("a100-80gb")
    shared = mixed_workload(20, seed=1)
    assert not simulate(shared, SimConfig(model, gpu, max_model_len=4096)).cores[0].kv.private_prompts
    alone = [WorkloadRequest(r.arrival, r.prompt_len, r.output_len) for r in shared]
    assert simulate(alone, SimConfig(model, gpu, max_model_len=4096)).cores[0].kv.private_prompts


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("pricing", ["constant", "roofline"])
def test_a_run_computes_a_prompts_chunks_as_step_by_step_would(groups: bool, shared: bool, pricing: str) -> None:
    """A prompt longer than the budget arrives while others decode: the run computes its chunks beside
    the decodes, then it decodes too, leaving the engine as step() calls do (4-token blocks, a 16-token
    budget). `shared`: its prompt is r0's context and what r0 is about to decode, so it starts on prefix
    hits and its chunks fill blocks equal to those r0's decodes fill (only the first in step order is
    indexed)."""
    from quanta.sim.cost_model import CostModel

    def engine() -> EngineCore:
        gpu = get_gpu("a100-80gb")
        cost = ConstantStepTime(0.01) if pricing == "constant" else CostModel(get_model("llama-3.1-8b"), gpu)
        lengths = {"r0": 120, "r1": 45, "r2": 30, "r3": 9}
        return EngineCore(
            SimExecutor(cost, num_blocks=80, output_lengths=lengths),
            VirtualClock(),
            SchedulerConfig("sarathi", 16, 8, 250),
            CacheConfig(block_size=4, num_blocks=80, block_groups=groups),
            check_integrity=True,
        )

    def request(i: int, prompt: list[int], now: float) -> Request:
        return Request(f"r{i}", prompt, SamplingParams(max_tokens=None), now, eos_token_ids=(2,))

    r0_prompt = list(range(3, 12))
    prompts = {  # step at which a request arrives -> (its number, its prompt)
        0: (0, r0_prompt),
        4: (1, r0_prompt + [0] * 60 if shared else list(range(100, 170))),
        30: (2, list(range(200, 253))),
        33: (3, list(range(300, 310))),  # a short one: admitted whole, while r2's chunks are still computing
    }
    cores = [engine(), engine()]
    stepped, jumped = cores
    num_chunk_runs = 0
    while jumped.has_unfinished() or prompts:
        due = min(prompts, default=None)
        if due is not None and jumped.num_steps >= due:
            i, prompt = prompts.pop(due)
            for core in cores:
                core.add_request(request(i, prompt, core.clock.now()))
        limit = 1000 if due is None else max(due - jumped.num_steps, 1)
        run = jumped.decode_run(limit=limit)
        if run is None:
            stepped.step()
            jumped.step()
        else:
            num_chunk_runs += bool(run.chunks)
            for _ in range(len(run)):
                stepped.step()
            jumped.apply_decode_run(run)
        assert_same_engines(stepped, jumped)
    assert not stepped.has_unfinished() and num_chunk_runs >= 2
    assert stepped.kv.pool.num_cache_hits == jumped.kv.pool.num_cache_hits
    assert (stepped.kv.pool.num_cache_hits > 0) == shared


@pytest.mark.parametrize("policy", ["sarathi", "continuum", "plas"])
def test_agent_programs_give_identical_timestamps_with_runs(policy: str) -> None:
    """Closed-loop agent programs (long prompts in chunks, tool calls between turns, continuum's KV pins,
    PLAS's attained-service ranks) in a tight pool: runs change no turn's times, cache hits or
    preemptions."""
    from quanta.sim.programs import ProgramSource, synthetic_programs

    progs = synthetic_programs("swe", 10, rate=2.0, seed=4)

    def run(decode_runs: bool) -> tuple[SimResult, list[tuple]]:
        source = ProgramSource(progs)
        cfg = SimConfig(
            get_model("llama-3.1-8b"),
            get_gpu("h100"),
            policy=policy,
            max_model_len=32768,
            max_num_batched_tokens=2048,
            num_kv_blocks=3000,
            check_integrity=True,
            decode_runs=decode_runs,
        )
        res = simulate(source, cfg)
        assert source.done()
        turns = [
            (t.request_id, t.arrival, t.first_token, t.finished, t.cached_tokens, t.preemptions)
            for r in source.records
            for t in r.turns
        ]
        return res, turns

    (steps, stepped), (runs, jumped) = run(False), run(True)
    assert jumped == stepped
    assert runs.num_steps == steps.num_steps and runs.num_decode_runs > 0
    assert runs.summary() == steps.summary()
    assert sum(t[4] for t in stepped) > 0  # later turns found their context in the prefix cache
