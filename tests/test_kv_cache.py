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
