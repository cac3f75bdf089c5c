"""The prefix cache's hash algorithms (CacheConfig.prefix_cache_hash): every component chains the same
keys, the keys are the same in another process, salts separate chains, and the cheap "tuple" hash makes
the simulator take exactly the decisions it takes with SHA-256."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quanta.cluster.prefix_index import PrefixIndex
from quanta.config import CacheConfig
from quanta.kv.block_pool import HASH_ALGOS, hash_block, hash_chain
from quanta.kv.manager import KVCacheManager
from quanta.request import Request
from quanta.sampling_params import SamplingParams
from quanta.sched.batch_plan import chain_hashes, reusable_blocks
from quanta.sim.hardware import get_gpu
from quanta.sim.model_presets import get_model
from quanta.sim.simulation import SimConfig, simulate
from quanta.sim.workload import WorkloadRequest
from test_sim_fast_forward import mixed_workload, timeline

BS = 16
SRC = str(Path(__file__).resolve().parents[1] / "src")
TOKENS = [(7 * i * i + 3) % 50_000 for i in range(200)]


def chain_in_subprocess(algo: str, salt: str | None, hash_seed: str) -> list:
    """The chain as another interpreter computes it (with another PYTHONHASHSEED: str hashing differs)."""
    code = (
        "import json, sys\n"
        "from quanta.kv.block_pool import hash_chain\n"
        "tokens, algo, salt = json.loads(sys.argv[1])\n"
        "extra = (('salt', salt),) if salt else ()\n"
        "out = hash_chain(None, tokens, 16, extra, algo)\n"
        "print(json.dumps([h.hex() if isinstance(h, bytes) else h for h in out]))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps([TOKENS, algo, salt])],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(proc.stdout)


@pytest.mark.parametrize("algo", HASH_ALGOS)
def test_chains_are_equal_across_processes(algo: str) -> None:
    for salt in (None, "tenant-a"):
        extra = (("salt", salt),) if salt else ()
        here = [h.hex() if isinstance(h, bytes) else h for h in hash_chain(None, TOKENS, BS, extra, algo)]
        assert here == chain_in_subprocess(algo, salt, "1") == chain_in_subprocess(algo, salt, "12345")


@pytest.mark.parametrize("algo", HASH_ALGOS)
def test_chain_is_blockwise_and_incremental(algo: str) -> None:
    extra = (("salt", "s"),)
    whole = hash_chain(None, TOKENS, BS, extra, algo)
    assert len(whole) == len(TOKENS) // BS
    parent = None
    for i, h in enumerate(whole):  # block by block, as hash_block
        parent = hash_block(parent, TOKENS[i * BS : (i + 1) * BS], extra if i == 0 else (), algo)
        assert parent == h
    head = hash_chain(None, TOKENS[: 5 * BS], BS, extra, algo)  # in pieces, as a request's tokens grow
    assert head + hash_chain(head[-1], TOKENS[5 * BS :], BS, (), algo) == whole


@pytest.mark.parametrize("algo", HASH_ALGOS)
def test_salts_and_contents_separate_chains(algo: str) -> None:
    plain = hash_chain(None, TOKENS, BS, (), algo)
    a = hash_chain(None, TOKENS, BS, (("salt", "a"),), algo)
    b = hash_chain(None, TOKENS, BS, (("salt", "b"),), algo)
    assert len({plain[0], a[0], b[0]}) == 3
    assert not set(plain) & set(a) and not set(a) & set(b)  # a salt scopes the whole chain
    other = list(TOKENS)
    other[3 * BS + 5] += 1  # one token differs in block 3: blocks 0-2 shared, every later one differs
    changed = hash_chain(None, other, BS, (), algo)
    assert changed[:3] == plain[:3] and all(x != y for x, y in zip(changed[3:], plain[3:], strict=True))
    assert len(set(plain)) == len(plain)


@pytest.mark.parametrize("algo", HASH_ALGOS)
def test_kv_manager_prefix_index_and_planner_agree(algo: str) -> None:
    kv = KVCacheManager(64, BS, hash_algo=algo)
    index = PrefixIndex(BS, hash_algo=algo)
    for salt in (None, "tenant-a"):
        req = Request(f"q{salt}", list(TOKENS), SamplingParams(), 0.0, cache_salt=salt)
        extra = (("salt", salt),) if salt else ()
        n = reusable_blocks(len(TOKENS), BS)
        assert chain_hashes(TOKENS, BS, extra, algo) == kv.block_hashes(req)[:n]
        assert index.request_hashes(req) == kv.block_hashes(req)


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown prefix-cache hash"):
        CacheConfig(prefix_cache_hash="md5")
    with pytest.raises(ValueError, match="unknown prefix-cache hash"):
        KVCacheManager(64, BS, hash_algo="md5")


@pytest.mark.parametrize("router", ["least-load", "prefix"])
def test_simulation_decides_the_same_with_either_hash(router: str) -> None:
    """Sessions and shared system prompts hit the prefix cache (and the prefix router reads the cluster
    index): every timestamp, cached-token count and hit is the same with SHA-256 and with "tuple"."""
    w = mixed_workload(160, seed=3)
    w += [WorkloadRequest(1.0 + 0.1 * i, 600, 20, prefix_group="sys", prefix_len=512) for i in range(20)]
    results = {}
    for algo in HASH_ALGOS:
        cfg = SimConfig(
            get_model("llama-2-7b"),
            get_gpu("a100-80gb"),
            replicas=2,
            router=router,
            num_kv_blocks=400,
            max_model_len=4096,
            keep_requests=True,
            prefix_cache_hash=algo,
            check_integrity=True,
        )
        res = simulate(sorted(w, key=lambda r: r.arrival), cfg)
        results[algo] = (timeline(res), res.num_steps, res.prefix_cache_hits, res.prefix_cache_queries)
    assert results["sha256"][2] > 0  # the workload does hit the cache
    assert results["sha256"] == results["tuple"]
