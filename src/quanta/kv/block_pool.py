"""Physical KV blocks: reference counts, the prefix-cache index, and an LRU list of free blocks.

A freed block keeps its hash (and so its contents stay findable) until it is handed out again:
eviction is lazy and takes the least recently freed block first.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A block's identity in the prefix cache: a digest chained over the parent's digest, the block's token
# ids and extra keys (cache salt, tenant), by one of HASH_ALGOS:
#   "sha256"  (the engine's default) a SHA-256 digest (bytes). Cryptographic, because whoever chooses
#             prompts could otherwise craft two prefixes with one key and read another user's KV (the
#             class of CVE-2025-25183, where Python's hash() keyed the chain).
#   "tuple"   (the simulator's default) Python's built-in hash of the tuple (parent, ids), an int. About
#             10x cheaper per block, and deterministic across processes on one Python version (ints and
#             tuples of ints are not salted by PYTHONHASHSEED; extra keys, which may hold strings, enter
#             as an int derived from their SHA-256). 64 bits and not collision-resistant: for simulated
#             or trusted prompts only.
# Hashes are compared across components (KV manager, cluster prefix index, batch planner, swap space), so
# every one of them must chain with `hash_chain` / `hash_block` under the same algorithm.
BlockHash = bytes | int
HASH_ALGOS = ("sha256", "tuple")


class _Unindexed:
    """The mark of a full block whose hash nobody computed, since no other request could look it up (see
    KVCacheManager's `private_prompts`). It stands in for a hash wherever only a hash's presence counts
    (the allocator's eviction order, lazy eviction), and is never a key of the prefix index."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNINDEXED"


UNINDEXED = _Unindexed()

_ROOT = bytes(32)  # the parent of a request's first block (sha256)
_PACKERS: dict[int, struct.Struct] = {}


def check_hash_algo(algo: str) -> str:
    if algo not in HASH_ALGOS:
        raise ValueError(f"unknown prefix-cache hash {algo!r}; choose from {', '.join(HASH_ALGOS)}")
    return algo


@functools.lru_cache(maxsize=4096)
def _extra_int(extra_keys: tuple) -> int:
    """Extra keys as a 64-bit int for the "tuple" hash: their repr's SHA-256, so strings (salted by
    hash()) enter deterministically."""
    return int.from_bytes(hashlib.sha256(repr(extra_keys).encode()).digest()[:8], "little")


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple = (), algo: str = "sha256"
) -> BlockHash:
    if algo == "tuple":
        if extra_keys:  # one element more: no block without extra keys has this shape
            return hash((parent or 0, _extra_int(extra_keys), tuple(token_ids)))
        return hash((parent or 0, tuple(token_ids)))
    n = len(token_ids)
    packer = _PACKERS.get(n)
    if packer is None:
        packer = _PACKERS[n] = struct.Struct(f"<I{n}q")
    # Fixed-size fields first (parent, count, ids), so the repr of the extra keys cannot shift them.
    data = (parent or _ROOT) + packer.pack(n, *token_ids)
    if extra_keys:
        data += repr(extra_keys).encode()
    return hashlib.sha256(data).digest()


def hash_chain(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple = (),
    algo: str = "sha256",
) -> list[BlockHash]:
    """`hash_block` over the consecutive full blocks of token_ids, each chained to the one before, the
    first to `parent` and alone carrying `extra_keys`: the same digests, computed in one pass."""
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    out: list[BlockHash] = []
    if algo == "tuple":
        prev_int = parent or 0
        append = out.append
        # The blocks as tuples of block_size ids, cut by zip from one iterator (no slice per block).
        blocks = zip(*[iter(token_ids)] * block_size)
        if extra_keys:
            prev_int = hash((prev_int, _extra_int(extra_keys), next(blocks)))
            append(prev_int)
        for block in itertools.islice(blocks, num_blocks - len(out)):
            prev_int = hash((prev_int, block))
            append(prev_int)
        return out
    n = num_blocks * block_size
    raw = struct.pack(f"<{n}q", *token_ids[:n])
    head = struct.pack("<I", block_size)
    width = 8 * block_size
    sha256 = hashlib.sha256
    prev = parent or _ROOT
    for i in range(num_blocks):
        data = prev + head + raw[i * width : (i + 1) * width]  # type: ignore[operator]
        if i == 0 and extra_keys:
            data += repr(extra_keys).encode()
        prev = sha256(data).digest()
        out.append(prev)
    return out


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | _Unindexed | None = None
    free_batch: int = 0  # which `free` call last released it: blocks released together age together


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, contiguous: bool = False) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        # Block groups: extend a request's last block with its successor when free, and otherwise start
        # from the bottom of the free range holding the LRU block, so requests own long contiguous runs.
        self.contiguous = contiguous
        self._num_free_calls = 0
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, oldest first: the eviction order.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self.num_cache_queries = 0  # blocks looked up
        self.num_cache_hits = 0
        # Hashes indexed and evicted since the last `drain_hash_log` (None: not logged). A cluster's
        # prefix-aware router mirrors each instance's index from these deltas. A reader that stops
        # draining (a router that never reads KV state) must not make the log grow without bound: past
        # `_log_cap` entries, more than a copy of the whole index would take, the log stops and the next
        # drain hands over the whole index instead.
        self._stored: list[BlockHash] | None = None
        self._evicted: list[BlockHash] | None = None
        self._log_cap = 2 * num_blocks

    def drain_hash_log(self) -> tuple[list[BlockHash], list[BlockHash], bool]:
        """(hashes indexed, hashes evicted, whole) since the last call and (re)starts the log. `whole`: the
        log was not running (the first call, or it overflowed), so the first list is the whole index
        and replaces what the reader holds."""
        if self._stored is None or self._evicted is None:
            self._stored, self._evicted = [], []
            return list(self._cached), [], True
        out = (self._stored, self._evicted, False)
        self._stored, self._evicted = [], []
        return out

    def _bound_log(self) -> None:
        if self._stored is not None and len(self._stored) + len(self._evicted) > self._log_cap:  # type: ignore[arg-type]
            self._stored = self._evicted = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free ones, including evictable cached ones)."""
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def indexes_any(self, hashes: Iterable[BlockHash]) -> bool:
        """Whether any of these hashes is in the prefix index."""
        return not self._cached.keys().isdisjoint(hashes)

    def allocate(self, n: int, after: int | None = None) -> list[KVBlock]:
        """n blocks, least recently freed first; with `contiguous`, continuing after block `after`."""
        blocks = self.blocks
        return [blocks[i] for i in self.allocate_ids(n, after)]

    def allocate_ids(self, n: int, after: int | None = None) -> list[int]:
        """`allocate`, as block ids (what block tables hold)."""
        free = self._free
        if n > len(free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(free)} free")
        if not self.contiguous:
            out = [free.popitem(last=False)[0] for _ in range(n)]
        else:
            out = self._take_contiguous(n, after)
        blocks, cached, evicted = self.blocks, self._cached, self._evicted
        for i in out:
            block = blocks[i]
            block_hash = block.block_hash
            if block_hash is not None:  # lazy eviction
                if block_hash is not UNINDEXED:
                    del cached[block_hash]  # type: ignore[arg-type]
                    if evicted is not None:
                        evicted.append(block_hash)  # type: ignore[arg-type]
                block.block_hash = None
            block.ref_cnt = 1
        if evicted is not None:
            self._bound_log()
        return out

    def _take_contiguous(self, n: int, after: int | None) -> list[int]:
        """Pop n free block ids for `allocate` with block groups, in the order they are handed out."""
        free = self._free
        out: list[int] = []
        pop, get = free.pop, free.get
        while len(out) < n:
            if after is not None:
                # Successors of `after` while they are free and keep LRU order: the list is in
                # free-batch order, so its head holds the oldest batch, and a successor as old as
                # the head keeps it (one without a hash evicts nothing, whatever its age).
                head = next(iter(free))
                head_batch = free[head].free_batch
                while len(out) < n:
                    nxt = get(after + 1)
                    if nxt is None or (nxt.block_hash is not None and nxt.free_batch > head_batch):
                        break
                    after += 1
                    pop(after)
                    out.append(after)
                    if after == head and free:  # the head went: the next one is as old or younger
                        head = next(iter(free))
                        head_batch = free[head].free_batch
                if len(out) == n:
                    break
            # Requests free their blocks tail first, so the LRU block tops a range freed with it: start
            # from the low end of that range (same age, so LRU order holds) and take the range up to the
            # head in one go (each next block is a successor as old as the head).
            head = start = next(iter(free))
            batch = free[head].free_batch
            left = n - len(out)
            while head - start + 1 < left:
                lower = get(start - 1)
                if lower is None or lower.free_batch != batch:
                    break
                start -= 1
            taken = range(start, head + 1)
            deque(map(pop, taken), 0)  # pop each, looping in C
            out.extend(taken)
            after = head
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (they may be on the free list)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; blocks reaching zero go to the back of the LRU list, in the given order."""
        self.free_ids([b.block_id for b in blocks])

    def free_ids(self, block_ids: Iterable[int]) -> None:
        """`free` of the blocks with these ids."""
        self._num_free_calls += 1
        batch, free, blocks = self._num_free_calls, self._free, self.blocks
        for i in block_ids:
            block = blocks[i]
            ref_cnt = block.ref_cnt - 1
            assert ref_cnt >= 0, f"double free of block {i}"
            block.ref_cnt = ref_cnt
            if not ref_cnt:
                block.free_batch = batch
                free[i] = block

    def cache(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Make a full block findable by its hash. A block with an equal twin already indexed stays private."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block
        if self._stored is not None:
            self._stored.append(block_hash)
            self._bound_log()

    def cache_blocks(self, block_ids: Sequence[int], hashes: Sequence[BlockHash], start: int, stop: int) -> None:
        """`cache(blocks[block_ids[i]], hashes[i])` for i in range(start, stop), in that order."""
        if not self.enable_caching:
            return
        blocks, cached, stored = self.blocks, self._cached, self._stored
        for i in range(start, stop):
            block = blocks[block_ids[i]]
            block_hash = hashes[i]
            if block.block_hash is not None or block_hash in cached:
                continue
            block.block_hash = block_hash
            cached[block_hash] = block
            if stored is not None:
                stored.append(block_hash)
        if stored is not None:
            self._bound_log()

    def mark_unindexed(self, block_ids: Sequence[int], start: int, stop: int) -> None:
        """`cache_blocks` for blocks no other request can look up: they carry UNINDEXED, not a hash."""
        if not self.enable_caching:
            return
        blocks = self.blocks
        for i in range(start, stop):
            block = blocks[block_ids[i]]
            if block.block_hash is None:
                block.block_hash = UNINDEXED

    def uncache(self, block: KVBlock) -> None:
        """Make a block unfindable (its contents can no longer be trusted)."""
        if block.block_hash is UNINDEXED:
            block.block_hash = None
        elif block.block_hash is not None:
            del self._cached[block.block_hash]
            if self._evicted is not None:
                self._evicted.append(block.block_hash)
                self._bound_log()
            block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        if self._evicted is not None:
            self._evicted.extend(self._cached)
            self._bound_log()
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    def check_integrity(self) -> None:
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"block {block.block_id} has negative ref count"
            in_free = block.block_id in self._free
            assert in_free == (block.ref_cnt == 0), (
                f"block {block.block_id}: ref_cnt={block.ref_cnt} but on free list={in_free}"
            )
            if block.block_hash is not None and block.block_hash is not UNINDEXED:
                assert self._cached.get(block.block_hash) is block, f"block {block.block_id} hash not indexed"
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, f"index points to block {block.block_id} with another hash"
        assert len(self._free) <= self.num_blocks
