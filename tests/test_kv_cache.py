from __future__ import annotations

import pytest

from quanta.kv import BlockPool, KVCacheManager, hash_block
from quanta.request import Request, RequestStatus
from quanta.sampling_params import SamplingParams


def req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    r = Request(rid, tokens, SamplingParams(max_tokens=4), arrival_time=0.0)
    r.cache_salt = salt
    return r


def test_allocate_and_free_return_every_block() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = req("a", list(range(10)))
    assert kv.allocate_slots(r, 10)
    assert len(kv.block_ids("a")) == 3
    assert kv.num_free_blocks == 7
    kv.check_integrity()
    r.status = RequestStatus.FINISHED_STOPPED
    kv.free(r)
    assert kv.num_free_blocks == 10
    kv.check_integrity()


def test_allocation_fails_without_side_effects() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = req("a", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.num_free_blocks == 2
    assert "a" not in kv.req_blocks
    kv.check_integrity()


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = req("a", list(range(10)))
    assert kv.allocate_slots(a, 10)
    b = req("b", list(range(8)) + [99, 98, 97])
    hits = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == kv.block_ids("a")[:2]
    assert kv.allocate_slots(b, 11 - 8, hits)
    for block_id in kv.block_ids("a")[:2]:
        assert kv.pool.blocks[block_id].ref_cnt == 2
    kv.check_integrity()


def test_hit_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = req("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    same = req("b", list(range(8)))
    # All 8 tokens are cached, but the last one must run to produce logits.
    assert len(kv.get_computed_blocks(same)) == 1


def test_freed_cached_blocks_are_reused_then_evicted_lru() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = req("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    a.status = RequestStatus.FINISHED_STOPPED
    kv.free(a)
    # Cached contents survive the free.
    b = req("b", list(range(8)) + [50])
    assert len(kv.get_computed_blocks(b)) == 2
    # A request needing the whole pool evicts them.
    c = req("c", list(range(100, 116)))
    assert kv.allocate_slots(c, 16)
    assert kv.get_computed_blocks(b) == []
    kv.check_integrity()


def test_free_puts_tail_blocks_first_in_eviction_order() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    pool.free(reversed(blocks))
    evicted = pool.allocate(2)
    # The never-used block goes first, then the request's last block; its first block survives longest.
    assert [b.block_id for b in evicted] == [3, blocks[2].block_id]


def test_hash_chain_depends_on_parent_and_salt() -> None:
    h1 = hash_block(None, [1, 2])
    assert hash_block(h1, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(None, [1, 2], ("t1",)) != h1
    kv = KVCacheManager(num_blocks=8, block_size=2)
    assert kv.allocate_slots(req("a", [1, 2, 3, 4, 5], salt="tenant-a"), 5)
    assert kv.get_computed_blocks(req("b", [1, 2, 3, 4, 5], salt="tenant-b")) == []
    assert len(kv.get_computed_blocks(req("c", [1, 2, 3, 4, 5], salt="tenant-a"))) == 2


def test_usage_and_reset_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots(a, 5)
    assert kv.usage() == 3 / 8
    assert not kv.reset_prefix_cache()  # blocks in use
    a.status = RequestStatus.FINISHED_STOPPED
    kv.free(a)
    assert kv.usage() == 0.0
    assert len(kv.get_computed_blocks(req("b", [1, 2, 3, 4, 5]))) == 2
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(req("c", [1, 2, 3, 4, 5])) == []
    kv.check_integrity()


def test_disabled_caching_never_hits() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_caching=False)
    assert kv.allocate_slots(req("a", [1, 2, 3, 4, 5]), 5)
    assert kv.get_computed_blocks(req("b", [1, 2, 3, 4, 5])) == []


def test_check_integrity_catches_corruption() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots(req("a", list(range(8))), 8)
    kv.pool.blocks[kv.block_ids("a")[0]].ref_cnt += 1
    with pytest.raises(AssertionError):
        kv.check_integrity()


def _reference_take(pool: BlockPool, n: int, after: int | None) -> list[int]:
    """Block groups' allocation rule, written plainly (one lookup per block): successors of `after`
    while free and no younger than the LRU head (or hashless); else the head's range of its own free
    batch, taken from its low end, at most what is still needed."""
    free, out = pool._free, []
    while len(out) < n:
        if after is not None:
            while len(out) < n:
                nxt = free.get(after + 1)
                head = free[next(iter(free))]
                if nxt is None or (nxt.block_hash is not None and nxt.free_batch > head.free_batch):
                    break
                after += 1
                del free[after]
                out.append(after)
            if len(out) == n:
                break
        head = start = next(iter(free))
        while head - start + 1 < n - len(out) and (lower := free.get(start - 1)) is not None:
            if lower.free_batch != free[head].free_batch:
                break
            start -= 1
        for i in range(start, head + 1):
            del free[i]
        out.extend(range(start, head + 1))
        after = head
    return out


def test_block_group_allocation_follows_its_rule_under_random_traffic() -> None:
    """The pool's fast paths (ranges found in LRU order, windows doubling) hand out exactly the blocks
    the plain rule does, through allocations, frees in any order, prefix hits and evictions."""
    import copy
    import random

    rng = random.Random(7)
    pool = BlockPool(256, contiguous=True)
    held: list[list[int]] = []
    for step in range(3000):
        if held and (rng.random() < 0.45 or pool.num_free_blocks < 40):
            ids = held.pop(rng.randrange(len(held)))
            order = list(reversed(ids)) if rng.random() < 0.8 else rng.sample(ids, len(ids))
            pool.free_ids(order)
            continue
        if rng.random() < 0.1 and pool._cached:  # a prefix hit revives a cached block
            block = pool._cached[rng.choice(list(pool._cached))]
            if block.ref_cnt == 0:
                pool.touch([block])
                held.append([block.block_id])
                continue
        n = rng.randint(1, min(40, pool.num_free_blocks))
        after = held[-1][-1] if held and rng.random() < 0.5 else None
        twin = copy.deepcopy(pool)
        want = _reference_take(twin, n, after)
        got = pool.allocate_ids(n, after)
        assert got == want, f"step {step}"
        for i in got:
            if rng.random() < 0.7:
                pool.cache(pool.blocks[i], ("h", step, i))
        if after is not None and held:
            held[-1].extend(got)
        else:
            held.append(got)
    pool.check_integrity()
