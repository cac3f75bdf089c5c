"""Offline batches (issue 12): the global prefix plan, the `batch` policy in the scheduler alone, the
shared-prefix workload, and batch versus sarathi in the simulator."""

from __future__ import annotations

import random

import pytest

from helpers import STEP_TIME, null_engine, run_to_end
from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import VirtualClock
from quanta.engine.core import EngineCore
from quanta.executor.sim_executor import ConstantStepTime, SimExecutor
from quanta.kv.manager import KVCacheManager
from quanta.request import Request
from quanta.sampling_params import SamplingParams
from quanta.sched.batch_plan import chain_hashes, plan_batch, plan_prompts, reusable_blocks
from quanta.sched.policies.batch import BatchPolicy
from quanta.sched.policy import make_policy
from quanta.sim.hardware import get_gpu
from quanta.sim.model_presets import get_model
from quanta.sim.simulation import SimConfig, simulate
from quanta.sim.workload import LengthDist, prompt_token_ids, shared_prefix_batch

BS = 4


def shared_batch(
    groups: int, size: int, prefix: int, suffix: int, seed: int = 0, system: int = 0
) -> list[list[int]]:
    """`groups` x `size` prompts, shuffled: an optional system prompt shared by all, a prefix per group,
    a suffix of random ids per prompt (sometimes two prompts happen to share a suffix's first block)."""
    rng = random.Random(seed)
    head = list(range(5, 5 + system))
    out = []
    for g in range(groups):
        body = [10_000 + g * 1000 + i for i in range(prefix)]
        for _ in range(size):
            tail = [rng.randrange(100_000, 100_003) for _ in range(BS)] + [
                rng.randrange(200_000, 300_000) for _ in range(suffix)
            ]
            out.append(head + body + tail)
    rng.shuffle(out)
    return out


def brute_force_saved(prompts: list[list[int]], block_size: int) -> int:
    """Prompt tokens an ideal cache serves: every reusable block once, identified by its whole prefix."""
    distinct: set[tuple[int, ...]] = set()
    total = 0
    for p in prompts:
        n = reusable_blocks(len(p), block_size)
        total += n
        distinct.update(tuple(p[: (i + 1) * block_size]) for i in range(n))
    return (total - len(distinct)) * block_size


def requests_of(
    prompts: list[list[int]], max_tokens: int | list[int] = 4, arrival: float = 0.0
) -> list[Request]:
    mts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    return [
        Request(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=True), arrival_time=arrival)
        for i, (p, m) in enumerate(zip(prompts, mts))
    ]


def run_batch_engine(core: EngineCore, reqs: list[Request]) -> tuple[int, float]:
    """Run to the end; returns (steps, fraction of prompt tokens served from the prefix cache)."""
    computed = [0]
    core.step_observers.append(lambda out: computed.__setitem__(0, computed[0] + out.plan.num_batched_tokens))
    for r in reqs:
        core.add_request(r)
    steps = run_to_end(core)
    prompt = sum(r.num_prompt_tokens for r in reqs)
    decode = sum(r.num_output_tokens - 1 for r in reqs)
    assert all(r.num_output_tokens == r.sampling_params.max_tokens for r in reqs)
    # No leaked blocks: every block is free (or cached and free) once the batch is done.
    assert core.kv.num_free_blocks == core.kv.num_blocks and not core.kv.req_blocks
    core.scheduler.check_integrity()
    return steps, 1 - (computed[0] - decode) / prompt


# ---- planner -------------------------------------------------------------------------------------
def test_chain_hashes_are_the_prefix_cache_keys() -> None:
    ids = list(range(3, 3 + 37))
    kv = KVCacheManager(64, BS)
    for salt in (None, "tenant-a"):
        req = Request(f"q{salt}", ids, SamplingParams(), 0.0, cache_salt=salt)
        extra = (("salt", salt),) if salt else ()
        assert chain_hashes(ids, BS, extra) == kv.block_hashes(req)[: reusable_blocks(len(ids), BS)]
    assert reusable_blocks(36, BS) == 8 and reusable_blocks(37, BS) == 9  # one token is always computed


@pytest.mark.parametrize("seed", range(4))
def test_optimum_is_exact_and_groups_are_runs_of_siblings(seed: int) -> None:
    prompts = shared_batch(groups=6, size=5, prefix=24, suffix=6, seed=seed, system=8)
    prompts += [[7_000_000 + seed, 1, 2]]  # shorter than a block: shares nothing
    plan = plan_prompts(prompts, BS)
    assert plan.optimal_saved_tokens == brute_force_saved(prompts, BS)
    assert plan.total_prompt_tokens == sum(map(len, prompts))
    assert sorted(plan.order) == list(range(len(prompts)))
    shared = [g for g in plan.groups if g.prefix_blocks]
    # One group per prefix, at the group's prefix (system prompt included), not at the system prompt
    # alone and not at the block some suffixes happen to share: those deeper nodes are flattened.
    assert len(shared) == 6 and all(len(g.members) == 5 for g in shared)
    assert all(g.prefix_blocks == (8 + 24) // BS for g in shared)
    for g in shared:
        heads = {tuple(prompts[i][: g.prefix_blocks * BS]) for i in g.members}
        assert len(heads) == 1
        assert g.prefix_hash == chain_hashes(prompts[g.members[0]], BS)[g.prefix_blocks - 1]
        # Depth first inside the group: prompts sharing the suffix's first block run back to back.
        firsts = [tuple(prompts[i][32:36]) for i in g.members]
        assert all(firsts.index(x) == i or firsts[i - 1] == x for i, x in enumerate(firsts))
    solo = [g for g in plan.groups if not g.prefix_blocks]
    assert [g.members for g in solo] == [[len(prompts) - 1]]


def test_groups_run_by_decode_ratio_and_held_groups_first() -> None:
    prompts = shared_batch(groups=3, size=2, prefix=16, suffix=4)
    group_of = {tuple(p[:16]): [] for p in prompts}
    for i, p in enumerate(prompts):
        group_of[tuple(p[:16])].append(i)
    heads = list(group_of)
    decode = [0.0] * len(prompts)
    for rank, head in enumerate(heads):  # the last group expects the longest outputs
        for i in group_of[head]:
            decode[i] = 10.0 * (rank + 1)
    plan = plan_prompts(prompts, BS, decode)
    assert [tuple(prompts[g.members[0]][:16]) for g in plan.groups] == heads[::-1]
    assert plan.groups[0].decode_ratio > plan.groups[1].decode_ratio > plan.groups[2].decode_ratio
    by_trie = plan_prompts(prompts, BS, decode, group_order="trie")
    first_seen = [tuple(prompts[g.members[0]][:16]) for g in by_trie.groups]
    assert first_seen == sorted(heads, key=lambda h: min(group_of[h]))
    held = plan.groups[2].prefix_hash
    assert held is not None
    again = plan_batch(
        [chain_hashes(p, BS) for p in prompts],
        [len(p) for p in prompts],
        BS,
        decode,
        first_groups=frozenset({held}),
    )
    assert again.groups[0].prefix_hash == held


def test_plan_of_nothing_shared() -> None:
    prompts = [[i * 100 + j for j in range(9)] for i in range(1, 5)]
    plan = plan_prompts(prompts, BS)
    assert plan.optimal_saved_tokens == 0 and plan.optimal_saved_fraction == 0.0
    assert plan.order == [0, 1, 2, 3] and all(g.prefix_blocks == 0 for g in plan.groups)
    twice = plan_prompts([prompts[0], prompts[0]], BS)  # identical prompts: the second reuses all but one
    assert twice.optimal_saved_tokens == reusable_blocks(9, BS) * BS
    assert [len(g.members) for g in twice.groups] == [2]


# ---- the batch policy in the scheduler -----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_batch_policy_reaches_the_optimum_where_lru_does_not(seed: int) -> None:
    # 8 groups x 8 prompts with 64-token prefixes; the pool (64 blocks of 4) holds about 4 prefixes.
    prompts = shared_batch(groups=8, size=8, prefix=64, suffix=4, seed=seed)
    optimum = plan_prompts(prompts, BS).optimal_saved_fraction
    saved = {}
    steps = {}
    for policy in ("sarathi", "batch"):
        core = null_engine(policy, budget=64, num_blocks=64, block_size=BS, max_model_len=128)
        steps[policy], saved[policy] = run_batch_engine(core, requests_of(prompts))
    assert saved["batch"] >= optimum - 0.02 and saved["batch"] <= optimum + 1e-9
    assert saved["sarathi"] < optimum - 0.2
    assert steps["batch"] < steps["sarathi"]


def test_group_members_wait_for_the_prefix_then_share_it() -> None:
    """Admitted together, every member would compute the part of the prefix not yet scheduled; the
    policy admits the first, lets it schedule the whole prefix, then the others hit all of it."""
    prefix = list(range(1000, 1000 + 96))
    prompts = [prefix + [5000 + i, 6000 + i] for i in range(6)]
    core = null_engine("batch", budget=32, num_blocks=128, block_size=BS, max_model_len=256)
    reqs = requests_of(prompts)
    _, saved = run_batch_engine(core, reqs)
    assert saved == pytest.approx(plan_prompts(prompts, BS).optimal_saved_fraction)
    assert sorted(r.num_cached_tokens for r in reqs) == [0] + [96] * 5


def test_batch_policy_meters_projected_kv() -> None:
    """Running requests' prompt plus max_tokens stay under kv_fraction of the pool: nobody is preempted,
    where sarathi admits until the pool is full and then preempts as decodes grow."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 10**6) for _ in range(20)] for _ in range(24)]
    preempted = {}
    for policy in ("sarathi", "batch"):
        core = null_engine(policy, budget=64, num_blocks=64, block_size=BS, max_model_len=128)
        peak = [0]

        def observe(out: object, c: EngineCore = core, peak: list[int] = peak) -> None:
            peak[0] = max(peak[0], c.kv.num_blocks - c.kv.num_free_blocks)

        core.step_observers.append(observe)
        run_batch_engine(core, requests_of(prompts, max_tokens=40))
        preempted[policy] = core.scheduler.num_preemptions
        if policy == "batch":
            assert peak[0] <= 0.9 * 64
    assert preempted["batch"] == 0 < preempted["sarathi"]


def test_prefix_too_large_to_hold_and_tiny_pool_never_deadlock() -> None:
    # Each prefix is 96 tokens = 24 blocks, more than half of 0.9 x 48 blocks: not held, still served.
    prompts = shared_batch(groups=3, size=4, prefix=96, suffix=2, seed=5)
    core = null_engine("batch", budget=32, num_blocks=48, block_size=BS, max_model_len=160)
    run_batch_engine(core, requests_of(prompts, max_tokens=8))
    # A projection that always overflows (outputs far beyond the pool): one request at a time.
    core = null_engine("batch", budget=32, num_blocks=48, block_size=BS, max_model_len=160)
    run_batch_engine(core, requests_of(prompts[:4], max_tokens=50))


def test_underestimated_outputs_preempt_and_recover() -> None:
    """Without max_tokens the policy projects expected_output_len; outputs longer than that fill the
    pool, and the scheduler preempts: the batch still finishes, KV intact, reservations all released."""
    prompts = shared_batch(groups=2, size=6, prefix=32, suffix=2, seed=2)
    core = EngineCore(
        SimExecutor(ConstantStepTime(STEP_TIME), 48, token_id=1),
        VirtualClock(),
        SchedulerConfig("batch", 32, 32, 64, policy_args={"expected_output_len": 1}),
        CacheConfig(block_size=BS, num_blocks=48),
        check_integrity=True,
    )
    policy = core.policy
    assert isinstance(policy, BatchPolicy)
    reqs = [
        Request(f"u{i}", p, SamplingParams(max_tokens=None, ignore_eos=True), 0.0)
        for i, p in enumerate(prompts)
    ]
    for r in reqs:
        core.add_request(r)
    run_to_end(core)
    assert core.scheduler.num_preemptions > 0
    assert all(r.num_tokens == 64 for r in reqs)  # each ran to the end of its context
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert policy._projected == 0 and not policy._held


def test_arrivals_over_time_and_aborts() -> None:
    prompts = shared_batch(groups=4, size=4, prefix=32, suffix=4, seed=3)
    core = null_engine("batch", budget=32, num_blocks=96, block_size=BS, max_model_len=128)
    reqs = requests_of(prompts, max_tokens=6)
    for r in reqs[:8]:
        core.add_request(r)
    for _ in range(3):
        core.step()
    core.abort_requests(["r0", "r1", "r7"])  # running or waiting alike
    for r in reqs[8:]:
        core.add_request(r)  # the plan is rebuilt with them
    for _ in range(2):
        core.step()
    core.abort_requests(["r9"])
    run_to_end(core)
    done = [r for r in reqs if r.request_id not in ("r0", "r1", "r7", "r9")]
    assert all(r.num_output_tokens == 6 for r in done)
    assert core.kv.num_free_blocks == core.kv.num_blocks
    policy = core.policy
    assert isinstance(policy, BatchPolicy) and policy._projected == 0 and not policy._held


@pytest.mark.parametrize(
    "args",
    [{"kv_fraction": 0}, {"kv_fraction": 1.5}, {"expected_output_len": 0}, {"group_order": "random"}],
)
def test_batch_policy_args_are_checked(args: dict) -> None:
    with pytest.raises(ValueError):
        make_policy("batch", SchedulerConfig("batch", policy_args=args))


# ---- workload and simulation -------------------------------------------------------------------------------
def test_shared_prefix_workload_shares_exactly_the_prefixes() -> None:
    w = shared_prefix_batch(
        5, 4, LengthDist("uniform", 64, 64), LengthDist("uniform", 8, 24), LengthDist("uniform", 4, 9), seed=3
    )
    assert len(w) == 20 and {r.prefix_group for r in w} == {f"g{g}" for g in range(5)}
    assert [r.prefix_group for r in w] != sorted(r.prefix_group for r in w)  # shuffled
    assert all(r.max_tokens == r.output_len and r.arrival == 0.0 for r in w)
    prompts = prompt_token_ids(w)
    plan = plan_prompts(prompts, 16)
    assert len(plan.groups) == 5 and all(g.prefix_blocks == 4 for g in plan.groups)
    # Identical block hashes inside a group, none across groups or suffixes: the optimum is each prefix once.
    assert plan.optimal_saved_tokens == brute_force_saved(prompts, 16) == 5 * 3 * 64


def test_simulated_batch_policy_saves_the_optimum_and_beats_sarathi() -> None:
    """The adversarial batch scaled down: 16 groups x 16 prompts, 2k-token prefixes, shuffled, a pool
    of about 8 prefixes. Throughput is simulated time: the makespan of the whole batch."""
    w = shared_prefix_batch(
        16,
        16,
        LengthDist("uniform", 2048, 2048),
        LengthDist("uniform", 32, 128),
        LengthDist("uniform", 32, 256),
    )
    optimum = plan_prompts(prompt_token_ids(w), 16).optimal_saved_fraction
    out = {}
    for policy in ("batch", "sarathi"):
        cfg = SimConfig(
            get_model("llama-3.1-8b"), get_gpu("h100"), policy=policy, num_kv_blocks=1024, max_model_len=4096
        )
        res = simulate(w, cfg)
        makespan = max(r.times.finished for r in res.requests)
        out[policy] = (res.prefill_saved_fraction, sum(r.num_output_tokens for r in res.requests) / makespan)
    assert optimum - 0.02 <= out["batch"][0] <= optimum + 1e-9
    assert out["sarathi"][0] < optimum - 0.2
    assert out["batch"][1] >= 1.3 * out["sarathi"][1]


def test_simulate_cli_reports_prefill_saved_against_the_optimum(tmp_path) -> None:
    import json

    from helpers import run_cli

    out = tmp_path / "r.json"
    args = ["--trace", "shared-prefix", "--groups", "8", "--group-size", "8", "--prefix-len", "1024"]
    proc = run_cli(
        "simulate",
        *args,
        "--policy",
        "batch,sarathi",
        "--num-kv-blocks",
        "512",
        "--max-model-len",
        "2048",
        "--json",
        str(out),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["policy"]: r for r in json.loads(out.read_text())}
    w = shared_prefix_batch(
        8, 8, LengthDist("uniform", 1024, 1024), LengthDist("uniform", 32, 96), LengthDist("uniform", 64, 192)
    )
    optimum = plan_prompts(prompt_token_ids(w), 16).optimal_saved_fraction
    assert rows["batch"]["prefill_saved_optimum"] == pytest.approx(optimum)
    assert rows["batch"]["prefill_saved"] == pytest.approx(optimum)
    assert rows["sarathi"]["prefill_saved"] < optimum
    assert f"(optimum {optimum:.1%})" in proc.stdout
    bad = run_cli("simulate", *args, "--output-len", "0", timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("must be at least 1")
