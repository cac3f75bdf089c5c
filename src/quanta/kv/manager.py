"""KVCacheManager: which blocks each request holds, prefix-cache lookups, allocation and release, and
pins that keep a finished call's KV on the device while its program runs a tool."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quanta.kv.block_pool import UNINDEXED, BlockHash, BlockPool, KVBlock, check_hash_algo, hash_chain
from quanta.kv.swap_space import HostBlockPool, Run, merge_runs
from quanta.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class Pin:
    """A program's KV held past the end of its call: each block carries one reference for the pin, so it
    is neither free nor evictable until the pin expires, is released, or is dropped under pressure."""

    program: str
    blocks: list[int]  # block ids in token order (a prefix of the call's context)
    expires_at: float
    rank: float  # the program's first arrival: under memory pressure the latest program's pin goes first


class KVCacheManager:
    GROUP = 4  # blocks per allocation group when block_groups is on

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_caching: bool = True,
        num_host_blocks: int = 0,
        block_groups: bool = False,
        per_tenant: bool = False,
        hash_algo: str = "sha256",
        private_prompts: bool = False,
    ) -> None:
        self.block_size = block_size
        self.hash_algo = check_hash_algo(hash_algo)  # how block_hashes chains (block_pool.HASH_ALGOS)
        self.enable_caching = enable_caching
        self.block_groups = block_groups
        self.per_tenant = per_tenant  # prefix hits only between requests of the same tenant
        # The caller vouches that no two requests share a block of tokens (a simulator's synthetic
        # prompts): a request's blocks can then only ever be found by itself, once it gave them up
        # unfinished (preemption). Until then they carry UNINDEXED instead of a hash (no chain to compute,
        # no index to keep), which the allocator treats as it would their hashes; when the request gives
        # them up unfinished, their hashes are computed and indexed, and it is handled as usual from then
        # on. Hits, evictions and block ids are those of the full index (tests/test_sim_fast_forward.py).
        self.private_prompts = private_prompts and enable_caching
        self._published: set[str] = set()  # requests whose blocks are indexed as usual (private_prompts)
        self.pool = BlockPool(num_blocks, enable_caching, contiguous=block_groups)
        self.host = HostBlockPool(num_host_blocks, contiguous=block_groups)
        self.host_blocks: dict[str, list[int]] = {}  # swapped-out request id -> host block ids
        # Host blocks a swap-in still reads from: reusable only once the executor says the copy landed.
        self.host_in_flight: dict[str, list[int]] = {}
        # Of a swap-in in flight: the blocks, in token order, to offer to the prefix index once it lands.
        self._landing: dict[str, tuple[int, int]] = {}
        self.num_swap_runs = 0  # copies issued (per layer tensor): one per run of contiguous blocks
        self.num_swapped_blocks = 0
        self.num_swap_in_hits = 0  # blocks a swap-in found still cached on the device (not copied)
        self.req_blocks: dict[str, list[int]] = {}  # request id -> block ids, in token order
        self._req_hashes: dict[str, list[BlockHash]] = {}
        self._num_indexed: dict[str, int] = {}  # leading blocks of a request already offered to the index
        # Blocks pre-allocated for a request migrating in (request id -> block ids, in token order): owned,
        # but by no request of this engine until the migration commits.
        self.reserved: dict[str, list[int]] = {}
        self.pins: dict[str, Pin] = {}  # program -> its pin
        self.num_pinned_blocks = 0
        self.max_pinned_blocks = num_blocks  # global cap on pinned KV (blocks)
        self.max_blocks_per_pin = num_blocks  # per-program cap
        self._next_expiry = math.inf
        self.num_pins = 0  # pins made
        self.num_pins_expired = 0
        self.num_pins_dropped = 0  # released early for memory pressure

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table. The scheduler's plan hands this list to the executor as is."""
        return self.req_blocks[request_id]

    def block_hashes(self, req: Request) -> list[BlockHash]:
        """Chained hashes of the request's full blocks, extended as its tokens grow."""
        hashes = self._req_hashes.setdefault(req.request_id, [])
        bs = self.block_size
        tokens = req.all_token_ids
        start = len(hashes)
        if start < len(tokens) // bs:
            extra = self._first_block_keys(req) if start == 0 else ()
            parent = hashes[-1] if hashes else None
            hashes.extend(hash_chain(parent, tokens[start * bs :], bs, extra, self.hash_algo))
        return hashes

    def _first_block_keys(self, req: Request) -> tuple:
        """Keys that scope a request's whole chain (it hangs off its first block): salt, tenant."""
        keys: tuple = ()
        if req.cache_salt:
            keys += (("salt", req.cache_salt),)
        if self.per_tenant:
            keys += (("tenant", req.tenant),)
        return keys

    def get_computed_blocks(self, req: Request, count: bool = True) -> list[KVBlock]:
        """Longest cached prefix of the request's tokens, leaving at least one token to compute.
        `count=False` looks without counting the lookup in the hit-rate statistics."""
        if not self.enable_caching or req.sampling_params.prompt_logprobs is not None:
            return []  # prompt logprobs need the logits of every prompt position
        max_blocks = (req.num_tokens - 1) // self.block_size
        if self._is_private(req):  # nothing another request indexed can match, and it indexed nothing
            if count:
                self.pool.num_cache_queries += max_blocks
            return []
        hits: list[KVBlock] = []
        hashes = self.block_hashes(req)
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        if count:
            self.pool.num_cache_queries += max_blocks
            self.pool.num_cache_hits += len(hits)
        return hits

    def blocks_to_take(
        self,
        req: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None = None,
        num_free: int | None = None,
    ) -> int | None:
        """How many blocks `allocate_slots(req, num_new_tokens, computed_blocks)` would take off the free
        list (new blocks, block-group rounding, and prefix hits it revives from the free list), given
        `num_free` free blocks (default: the pool's now); None when it would fail. The scheduler's
        look-ahead and the allocation itself both count with this, so they cannot disagree."""
        counts = self._blocks_needed(req, num_new_tokens, computed_blocks, num_free)
        return None if counts is None else sum(counts)

    def _blocks_needed(
        self,
        req: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None,
        num_free: int | None,
    ) -> tuple[int, int] | None:
        """(new blocks to allocate, prefix hits revived from the free list), or None when they do not fit."""
        bs = self.block_size
        blocks = self.req_blocks.get(req.request_id)
        num_held = len(blocks) if blocks else 0
        hits = computed_blocks or ()
        assert not (hits and blocks), "prefix hits only apply to a request holding no blocks"
        num_tokens = req.num_computed_tokens + len(hits) * bs + num_new_tokens
        num_needed = max(cdiv(num_tokens, bs) - num_held - len(hits), 0)
        # Hits that sit on the free list stop being allocatable once we take them.
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        room = (self.pool.num_free_blocks if num_free is None else num_free) - num_free_hits
        if num_needed > room:
            return None
        if self.block_groups and num_needed > 0:
            # Grow in whole groups: a request's blocks stay in a few long runs (few copies per swap),
            # at the price of at most GROUP - 1 idle blocks per request. Only when the room is there.
            extra = -(num_held + len(hits) + num_needed) % self.GROUP
            if num_needed + extra <= room:
                num_needed += extra
        return num_needed, num_free_hits

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> bool:
        """Give `req` room for `num_new_tokens` more tokens after its computed ones (plus any prefix hits).

        Returns False and changes nothing when the pool is short.
        """
        bs = self.block_size
        blocks = self.req_blocks.get(req.request_id)
        if blocks is not None and not computed_blocks:
            num_tokens = req.num_computed_tokens + num_new_tokens
            if num_tokens <= len(blocks) * bs:  # fast path: a decode inside its last block
                if self.enable_caching and num_tokens >= (self._num_indexed.get(req.request_id, 0) + 1) * bs:
                    self._index_full_blocks(req, blocks, num_tokens)
                return True
        computed_blocks = computed_blocks or []
        counts = self._blocks_needed(req, num_new_tokens, computed_blocks, None)
        if counts is None:
            return False
        num_needed = counts[0]
        num_tokens = req.num_computed_tokens + len(computed_blocks) * bs + num_new_tokens
        if blocks is None:
            blocks = self.req_blocks[req.request_id] = []
        self.pool.touch(computed_blocks)
        blocks.extend(b.block_id for b in computed_blocks)
        if num_needed > 0:
            after = blocks[-1] if blocks else None
            blocks.extend(self.pool.allocate_ids(num_needed, after))
        self._index_full_blocks(req, blocks, num_tokens)
        return True

    # ---- runs of decode steps --------------------------------------------------------------------
    def max_decode_run(self, reqs: Sequence[Request], limit: int, chunks: Sequence[int] = ()) -> int:
        """The most steps, up to `limit`, in which every one of `reqs` (decodes: one token to compute
        each; with `chunks`, the last one computes those chunks in the first steps, then decodes) surely
        gets its slots: their blocks at the end of that many steps, with block-group rounding at its
        largest, fit in the free blocks. Nothing is freed during such a run."""
        bs, free = self.block_size, self.pool.num_free_blocks
        group = self.GROUP if self.block_groups else 1
        state = [(r.num_computed_tokens, len(self.req_blocks[r.request_id])) for r in reqs]
        if chunks:
            prompt_computed, prompt_held = state.pop()
            done = list(itertools.accumulate(chunks, initial=prompt_computed))

        def fits(k: int) -> bool:
            need = 0
            for computed, held in state:
                blocks = -(-cdiv(computed + k, bs) // group) * group
                if blocks > held:
                    need += blocks - held
            if chunks:
                computed = done[k] if k < len(done) else done[-1] + k - len(chunks)
                need += max(-(-cdiv(computed, bs) // group) * group - prompt_held, 0)
            return need <= free

        if fits(limit):
            return limit
        lo, hi = 0, limit  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def decode_run(
        self,
        reqs: Sequence[Request],
        num_steps: int,
        before_last_step: Callable[[], None] | None = None,
        chunks: Sequence[int] = (),
    ) -> None:
        """The KV bookkeeping of `num_steps` decode steps of `reqs`, as if each step called
        `allocate_slots(req, 1)` for them in order (for the last one, `allocate_slots(req, chunks[j])` in
        the first len(chunks) steps), but visiting only the steps where that call does something (takes a
        block, or offers a filled block to the prefix index; every chunk is visited). The run's tokens
        must be appended to the requests already; their num_computed_tokens is left as at the start.
        `max_decode_run` must have allowed the run. `before_last_step` is called once the blocks of
        every step but the last are taken (e.g. to read the pool's usage as step by step would have)."""
        bs, caching, indexed = self.block_size, self.enable_caching, self._num_indexed
        start = [r.num_computed_tokens for r in reqs]
        tables = [self.req_blocks[r.request_id] for r in reqs]  # grown in place by allocate_slots
        hook_at = num_steps - 1 if before_last_step is not None else num_steps + 1  # + 1: never
        # The prompt (the last request) computes chunks[j] in step j < k, then one token a step: its
        # tokens computed before step j >= k are start[p] + j, as a decode's.
        k, p = len(chunks), len(reqs) - 1
        assert k <= num_steps, "chunks beyond the run"
        done = list(itertools.accumulate(chunks, initial=start[p])) if chunks else []
        if chunks:
            start[p] = done[-1] - k

        def reach(j: int) -> None:  # the events of step j come next (j = num_steps: the run is done)
            nonlocal hook_at
            if j >= hook_at:
                before_last_step()  # type: ignore[misc]
                hook_at = num_steps + 1

        def allocate(req: Request, computed: int, n: int) -> None:  # a step's allocate_slots(req, n)
            before, req.num_computed_tokens = req.num_computed_tokens, computed
            ok = self.allocate_slots(req, n)
            assert ok, "a run was planned without room for its blocks"
            req.num_computed_tokens = before

        def take_block(i: int, j: int) -> None:  # step j's allocate_slots(reqs[i], 1), which takes a block
            allocate(reqs[i], start[i] + j, 1)

        def chunk(j: int) -> None:  # step j's allocate_slots(prompt, chunks[j])
            allocate(reqs[p], done[j], chunks[j])

        def first_block(i: int) -> int:  # the first step whose call takes a block for reqs[i]
            j = len(tables[i]) * bs - start[i]
            return max(j, k) if i == p else j

        if caching and self._fills_commute(reqs, num_steps, start[p] + num_steps if chunks else None):
            # Only the allocations keep their step order (they decide block ids, and evict); each
            # request's filled blocks are offered to the index once, after its last step.
            events = [(j, i) for i in range(len(reqs)) if (j := 0 if i == p and k else first_block(i)) < num_steps]
            heapq.heapify(events)
            while events:
                j, i = events[0]
                reach(j)
                if i == p and j < k:
                    chunk(j)
                    j += 1
                    if j >= k:
                        j = first_block(i)
                else:
                    take_block(i, j)
                    j = first_block(i)
                if j < num_steps:
                    heapq.heapreplace(events, (j, i))
                else:
                    heapq.heappop(events)
            reach(num_steps)
            for i, req in enumerate(reqs):
                self._index_full_blocks(req, tables[i], start[i] + num_steps)
            return

        def next_event(i: int, after: int) -> int:
            # First step > after at which step j's call (computing token start + j) is not a no-op.
            if i == p and after + 1 < k:
                return after + 1  # the prompt's next chunk
            c = start[i]
            j = len(tables[i]) * bs - c  # needs a block
            if caching:
                j = min(j, (indexed.get(reqs[i].request_id, 0) + 1) * bs - c - 1)  # fills one
            return max(j, after + 1, k if i == p else 0)

        # The first events, inline (most requests have none within a short run: only those go on the heap).
        events = []
        for i, req in enumerate(reqs):
            if i == p and k:
                events.append((0, i))
                continue
            j = len(tables[i]) * bs - start[i]
            if caching:
                j = min(j, (indexed.get(req.request_id, 0) + 1) * bs - start[i] - 1)
            if j < num_steps:
                events.append((max(j, 0), i))
        heapq.heapify(events)
        while events and events[0][0] < num_steps:
            j, i = events[0]
            reach(j)
            req, num_tokens = reqs[i], start[i] + j + 1
            if i == p and j < k:
                chunk(j)
            elif num_tokens <= len(tables[i]) * bs:  # allocate_slots' fast path: only a block fills
                self._index_full_blocks(req, tables[i], num_tokens)
            else:
                take_block(i, j)
            heapq.heapreplace(events, (next_event(i, j), i))
        reach(num_steps)

    def _fills_commute(self, reqs: Sequence[Request], num_steps: int, prompt_done: int | None = None) -> bool:
        """Whether offering the blocks that `num_steps` decode steps of `reqs` fill to the prefix index
        gives the same index in any order, and whatever the run's allocations evict in between: no
        filled block's hash is indexed already, and no two of them are equal. (Requests with identical
        histories, e.g. parallel samples, fill equal blocks: the first in step order is indexed.)
        `prompt_done`: the tokens the last request has computed after the run, when it computed a prompt
        in chunks."""
        bs, indexed = self.block_size, self._num_indexed
        filled: list[BlockHash] = []
        for i, req in enumerate(reqs):
            if self._is_private(req):
                continue  # marked, not indexed: their fills are unique and commute
            first = indexed.get(req.request_id, 0)
            done = req.num_computed_tokens + num_steps
            if prompt_done is not None and i == len(reqs) - 1:
                done = prompt_done
            last = min(done, req.num_tokens) // bs
            if last > first:
                filled.extend(self.block_hashes(req)[first:last])
        return len(set(filled)) == len(filled) and not self.pool.indexes_any(filled)

    def _index_full_blocks(self, req: Request, blocks: list[int], num_tokens: int) -> None:
        """Offer full blocks to the prefix index as soon as they are scheduled.

        Indexing before the step runs is safe: the executor writes a layer's KV for the whole batch
        before any attention reads it, so a request that hits these blocks in the same step sees them.
        """
        if not self.enable_caching:
            return
        num_full = min(num_tokens, req.num_tokens) // self.block_size
        start = self._num_indexed.get(req.request_id, 0)
        if num_full <= start:
            return
        if self._is_private(req):
            self.pool.mark_unindexed(blocks, start, num_full)
        else:
            self.pool.cache_blocks(blocks, self.block_hashes(req), start, num_full)
        self._num_indexed[req.request_id] = num_full

    def _is_private(self, req: Request) -> bool:
        return self.private_prompts and req.request_id not in self._published

    def _publish(self, req: Request) -> None:
        """The request gives up its blocks unfinished (private_prompts): index what it marked, as the full
        index would hold it, since it may look them up when it comes back."""
        self._published.add(req.request_id)
        blocks = self.req_blocks.get(req.request_id)
        num_marked = self._num_indexed.get(req.request_id, 0)
        if not blocks or not num_marked:
            return
        pool_blocks = self.pool.blocks
        for block_id in blocks[:num_marked]:
            if pool_blocks[block_id].block_hash is UNINDEXED:  # (not one uncached since)
                pool_blocks[block_id].block_hash = None
        self.pool.cache_blocks(blocks, self.block_hashes(req), 0, num_marked)

    def uncache_uncomputed(self, req: Request) -> None:
        """Take out of the prefix index the blocks that were offered when a chunk was scheduled but whose
        KV is not written yet (the request is preempted or unscheduled before its step runs)."""
        blocks = self.req_blocks.get(req.request_id)
        start = req.num_computed_tokens // self.block_size
        if not blocks or self._num_indexed.get(req.request_id, 0) <= start:
            return
        pool_blocks = self.pool.blocks
        for block_id in blocks[start : self._num_indexed[req.request_id]]:
            assert pool_blocks[block_id].ref_cnt == 1, "a block not yet written was shared"
            self.pool.uncache(pool_blocks[block_id])
        self._num_indexed[req.request_id] = start

    def discard(self, req: Request) -> None:
        """Free a request whose KV may never have been written (its step failed): no block it holds may
        stay findable in the prefix index, since a later hit would read garbage."""
        pool_blocks = self.pool.blocks
        for block_id in self.req_blocks.get(req.request_id, ()):
            self.pool.uncache(pool_blocks[block_id])
        self.free(req)

    # ---- live migration ------------------------------------------------------------------------
    def reserve(self, request_id: str, num_blocks: int) -> bool:
        """Grow the pre-allocation for an incoming request to `num_blocks` blocks; False (nothing changes)
        when the pool is short. A smaller number than held keeps what is held."""
        held = self.reserved.setdefault(request_id, [])
        need = num_blocks - len(held)
        if need <= 0:
            return True
        if need > self.pool.num_free_blocks:
            if not held:
                del self.reserved[request_id]
            return False
        held.extend(self.pool.allocate_ids(need, held[-1] if held else None))
        return True

    def unreserve(self, request_id: str) -> None:
        """Free a pre-allocation (the migration was aborted); its blocks were never indexed."""
        blocks = self.reserved.pop(request_id, None)
        if blocks:
            self.pool.free_ids(reversed(blocks))

    def adopt_reserved(self, req: Request, num_blocks: int) -> None:
        """The migration commits: the request owns the first `num_blocks` reserved blocks (their KV now
        written up to its computed tokens; extra ones go back) and its full blocks join the prefix index."""
        blocks = self.reserved.pop(req.request_id)
        assert len(blocks) >= num_blocks, f"{req.request_id}: {len(blocks)} reserved, {num_blocks} needed"
        assert req.request_id not in self.req_blocks
        extra = blocks[num_blocks:]
        if extra:
            self.pool.free_ids(reversed(extra))
        self.req_blocks[req.request_id] = blocks[:num_blocks]
        self._index_full_blocks(req, self.req_blocks[req.request_id], req.num_computed_tokens)

    # ---- swapping -------------------------------------------------------------------------------
    def is_swapped(self, request_id: str) -> bool:
        return request_id in self.host_blocks

    def swap_out(self, req: Request) -> list[Run] | None:
        """Move the request's computed KV to host blocks and free its device blocks. Returns the copies
        (device -> host), or None (nothing changed) when there is nothing to keep or no host room."""
        blocks = self.req_blocks.get(req.request_id)
        n = cdiv(req.num_computed_tokens, self.block_size)
        if not blocks or n == 0 or n > self.host.num_free_blocks:
            return None
        host = self.host.allocate(n)
        runs = self._count(merge_runs(list(zip(blocks[:n], host)), self.block_groups))
        self._free_device(req)
        self.host_blocks[req.request_id] = host
        return runs

    def swap_in_blocks_needed(self, req: Request) -> int:
        return len(self.host_blocks[req.request_id])

    def swap_in(self, req: Request) -> list[Run] | None:
        """Device blocks for a swapped-out request's KV; returns the copies (host -> device), or None when
        the pool is short. Leading blocks still in the prefix cache on the device are taken from there
        and not copied. The copied blocks join the prefix index once their contents land (swap_in_landed)."""
        host = self.host_blocks[req.request_id]
        hits: list[KVBlock] = []
        full = min(len(host), req.num_computed_tokens // self.block_size)  # blocks its KV fills
        if self.enable_caching:
            for block_hash in self.block_hashes(req)[:full]:
                block = self.pool.lookup(block_hash)
                if block is None:
                    break
                hits.append(block)
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if len(host) - len(hits) > self.pool.num_free_blocks - num_free_hits:
            return None
        assert req.request_id not in self.req_blocks
        self.pool.touch(hits)
        after = hits[-1].block_id if hits else None
        copied = self.pool.allocate_ids(len(host) - len(hits), after)
        self.req_blocks[req.request_id] = [b.block_id for b in hits] + copied
        # The hits are indexed; the copied blocks join the index when their contents land.
        self._num_indexed[req.request_id] = len(hits)
        if self.enable_caching and full > len(hits):
            self._landing[req.request_id] = (len(hits), full)
        self.num_swap_in_hits += len(hits)
        runs = self._count(merge_runs(list(zip(host[len(hits) :], copied)), self.block_groups))
        del self.host_blocks[req.request_id]
        # The copies read these host blocks until they land; a swap-out must not overwrite them before.
        self.host_in_flight[req.request_id] = host
        return runs

    def swap_in_landed(self, request_id: str) -> None:
        """The executor finished copying this request's KV in: its host blocks can be reused."""
        host = self.host_in_flight.pop(request_id, None)
        if host:
            self.host.free(host)
        landing = self._landing.pop(request_id, None)
        blocks = self.req_blocks.get(request_id)
        if landing is not None and blocks is not None:
            start, full = landing
            self.pool.cache_blocks(blocks, self._req_hashes[request_id], start, full)
            self._num_indexed[request_id] = full

    def _count(self, runs: list[Run]) -> list[Run]:
        self.num_swap_runs += len(runs)
        self.num_swapped_blocks += sum(n for _, _, n in runs)
        return runs

    def free(self, req: Request) -> None:
        """Release the request's device and host blocks."""
        self._free_device(req)
        host = self.host_blocks.pop(req.request_id, None)
        if host:
            self.host.free(host)
        if req.finished:
            self._req_hashes.pop(req.request_id, None)
            self._published.discard(req.request_id)

    def forget(self, request_id: str) -> None:
        """Drop the hashes kept for a request that left this engine without finishing here (migrated)."""
        self._req_hashes.pop(request_id, None)
        self._published.discard(request_id)

    def _free_device(self, req: Request) -> None:
        """Release the device blocks (tail first to the LRU list, so shared prefixes live longest)."""
        if not req.finished and self._is_private(req):
            self._publish(req)
        blocks = self.req_blocks.pop(req.request_id, None)
        if blocks:
            self.pool.free_ids(reversed(blocks))
        self._num_indexed.pop(req.request_id, None)
        self._landing.pop(req.request_id, None)

    # ---- pins -------------------------------------------------------------------------------------
    def pin(self, req: Request, expires_at: float, rank: float = 0.0) -> int:
        """Keep the leading prefix-indexed blocks of `req` (a call about to be freed) until `expires_at`,
        within the per-program and global caps; replaces the program's earlier pin. Returns the number of
        blocks pinned (0: nothing pinned)."""
        program = req.program
        assert program is not None, "only a program's call can be pinned"
        assert not self.private_prompts, "a program's calls share their prompts: private_prompts cannot hold"
        blocks = self.req_blocks.get(req.request_id, [])
        pool_blocks = self.pool.blocks
        old = self.pins.get(program)
        room = self.max_pinned_blocks - self.num_pinned_blocks + (len(old.blocks) if old else 0)
        n = 0
        limit = min(len(blocks), self.max_blocks_per_pin, room)
        # Only blocks a later call can find (indexed, in an unbroken chain) are worth holding.
        while n < limit and pool_blocks[blocks[n]].block_hash is not None:
            n += 1
        if n == 0:
            return 0
        held = blocks[:n]
        self.pool.touch(pool_blocks[i] for i in held)  # before the old pin lets go: the shared prefix stays
        if old is not None:
            self._release(old)
        self.pins[program] = Pin(program, held, expires_at, rank)
        self.num_pinned_blocks += n
        self._next_expiry = min(self._next_expiry, expires_at)
        self.num_pins += 1
        return n

    def has_pin(self, program: str | None) -> bool:
        return program is not None and program in self.pins

    def claim_pin(self, program: str | None) -> None:
        """The program's next call has arrived in time: its pin no longer expires, and lasts until that
        call is admitted (or memory pressure drops it)."""
        pin = self.pins.get(program) if program is not None else None
        if pin is not None:
            pin.expires_at = math.inf

    def unpin(self, program: str | None) -> int:
        """Release the program's pin (its next call has its blocks now, or it ended): the blocks go back to
        the LRU list with their hashes, prefix hits until reused. Returns the blocks released."""
        pin = self.pins.pop(program, None) if program is not None else None
        if pin is None:
            return 0
        self._release(pin)
        return len(pin.blocks)

    def _release(self, pin: Pin) -> None:
        self.pool.free_ids(reversed(pin.blocks))  # tail first, as a request's
        self.num_pinned_blocks -= len(pin.blocks)

    @property
    def next_pin_expiry(self) -> float:
        """The clock time the next pin runs out (inf: none)."""
        return self._next_expiry

    def expire_pins(self, now: float) -> int:
        """Release the pins whose time-to-live has passed; returns how many."""
        if now < self._next_expiry:
            return 0
        expired = [p for p in self.pins.values() if p.expires_at <= now]
        for pin in expired:
            self.unpin(pin.program)
        self.num_pins_expired += len(expired)
        self._next_expiry = min((p.expires_at for p in self.pins.values()), default=math.inf)
        return len(expired)

    def drop_pin(self, keep: str | None = None, reused: Sequence[KVBlock] = ()) -> bool:
        """Memory pressure: release the pin of the latest-arriving program other than `keep` (the asking
        call's own), whose blocks a request can then take. When no other is left, `keep`'s pin goes too
        if it holds blocks besides `reused`, the prefix hits the call is about to take (releasing only
        those would free nothing for it). False when nothing was dropped."""
        candidates = [p for p in self.pins.values() if p.program != keep]
        if candidates:
            drop = max(candidates, key=lambda p: p.rank).program
        else:
            own = self.pins.get(keep) if keep is not None else None
            if own is None or not set(own.blocks).difference(b.block_id for b in reused):
                return False
            drop = own.program
        self.unpin(drop)
        self.num_pins_dropped += 1
        return True

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        """Every block is free, cached-and-free, or owned; ref counts equal the number of owners."""
        self.pool.check_integrity()
        owners: Counter[int] = Counter()
        for request_id, blocks in (*self.req_blocks.items(), *self.reserved.items()):
            assert len(set(blocks)) == len(blocks), f"{request_id} holds a block twice"
            owners.update(blocks)
        num_pinned = 0
        for program, pin in self.pins.items():
            assert pin.program == program and pin.blocks, f"pin of {program} is malformed"
            assert len(set(pin.blocks)) == len(pin.blocks), f"pin of {program} holds a block twice"
            assert len(pin.blocks) <= self.max_blocks_per_pin, f"pin of {program} is over the per-program cap"
            owners.update(pin.blocks)
            num_pinned += len(pin.blocks)
        assert num_pinned == self.num_pinned_blocks <= self.max_pinned_blocks, "pinned KV over its cap"
        for block in self.pool.blocks:
            assert block.ref_cnt == owners.get(block.block_id, 0), (
                f"block {block.block_id}: ref_cnt={block.ref_cnt}, owners={owners.get(block.block_id, 0)}"
            )
        held = [b for blocks in (*self.host_blocks.values(), *self.host_in_flight.values()) for b in blocks]
        assert len(set(held)) == len(held), "a host block has two owners"
        assert len(held) + self.host.num_free_blocks == self.host.num_blocks, "host blocks leaked"
        assert not set(held) & self.host.free_block_ids(), "a host block is both owned and free"
        assert not self.host_blocks.keys() & self.req_blocks.keys(), "a request holds device and host KV"
        assert self._landing.keys() <= self.host_in_flight.keys(), "a swap-in to index has landed already"
