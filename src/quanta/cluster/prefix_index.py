"""PrefixIndex: which prefix-cache block hashes each instance holds, mirrored exactly from the hashes
its snapshots report stored and evicted (InstanceState), plus the prompts dispatched since (optimistic:
they will be stored once their prefill runs). The prefix router reads it to find, per instance, how
many leading blocks of a prompt it would serve from cache."""

from __future__ import annotations

from collections.abc import Sequence

from quanta.cluster.state import InstanceState
from quanta.kv.block_pool import BlockHash, check_hash_algo, hash_chain
from quanta.request import Request


class PrefixIndex:
    def __init__(self, block_size: int = 16, per_tenant: bool = False, hash_algo: str = "sha256") -> None:
        self.block_size = block_size
        self.per_tenant = per_tenant  # as the instances' CacheConfig.prefix_cache_per_tenant
        self.hash_algo = check_hash_algo(hash_algo)  # as the instances' CacheConfig.prefix_cache_hash
        self._hashes: dict[int, set[BlockHash]] = {}

    def update(self, state: InstanceState) -> None:
        held = self._hashes.setdefault(state.instance_id, set())
        if state.hashes_whole:  # the instance's whole index: what was mirrored or assumed before is stale
            held.clear()
        held.update(state.stored_hashes)
        # Stored then evicted within one period reads as gone; evicted then stored again reads as gone
        # too (a miss the router may overestimate, never a hit it invents).
        held.difference_update(state.evicted_hashes)

    def remove(self, instance_id: int) -> None:
        self._hashes.pop(instance_id, None)

    def request_hashes(self, req: Request) -> list[BlockHash]:
        """Chained hashes of the prompt's full blocks, as the instances' KV managers compute them."""
        keys: tuple = ()
        if req.cache_salt:
            keys += (("salt", req.cache_salt),)
        if self.per_tenant:
            keys += (("tenant", req.tenant),)
        return hash_chain(None, req.prompt_token_ids, self.block_size, keys, self.hash_algo)

    def matched_blocks(self, instance_id: int, hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of a prompt with these hashes that the instance holds."""
        held = self._hashes.get(instance_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def dispatched(self, instance_id: int, hashes: Sequence[BlockHash]) -> None:
        self._hashes.setdefault(instance_id, set()).update(hashes)

    def num_hashes(self, instance_id: int) -> int:
        return len(self._hashes.get(instance_id, ()))
