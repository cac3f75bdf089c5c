"""ClusterView: the global scheduler's picture of the instances, from their last snapshots plus the
dispatches made since.

Each dispatch counts at once (`dispatched`): a router that reads only polled snapshots would otherwise
send every request of a burst to the instance that looked emptiest at the last poll (herding). The
counted dispatches are reconciled with the next snapshot through `InstanceState.num_added` (the
instance's count of add_request calls): those the snapshot already includes are dropped. This assumes
every request reaches an instance through this view.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

from quanta.cluster.prefix_index import PrefixIndex
from quanta.cluster.state import InstanceState
from quanta.kv.block_pool import BlockHash
from quanta.kv.manager import cdiv
from quanta.request import Request


@dataclass(slots=True)
class _Dispatch:
    seq: int  # the instance's add count once this request is added
    blocks: int
    tokens: int
    high_priority: bool


class ClusterView:
    def __init__(self, block_size: int = 16, per_tenant: bool = False, hash_algo: str = "sha256") -> None:
        self.block_size = block_size
        self.prefix = PrefixIndex(block_size, per_tenant, hash_algo)
        self._states: dict[int, InstanceState] = {}
        self._pending: dict[int, deque[_Dispatch]] = {}
        self._sent: dict[int, int] = {}  # dispatches sent to each instance, in all
        self._effective: dict[int, InstanceState] = {}  # cache of state(i); dropped on any change
        self.draining: set[int] = set()
        self.migrations: dict[str, tuple[int, int]] = {}  # request id -> (source, destination), in flight
        self.num_dispatched = 0
        self._ids: list[int] | None = None  # sorted(self._states), kept until an instance comes or goes

    # ---- instances --------------------------------------------------------------------------------
    def update(self, state: InstanceState) -> None:
        """A new snapshot from an instance (its first one adds it to the cluster)."""
        i = state.instance_id
        sent = self._sent.setdefault(i, state.num_added)
        assert state.num_added <= sent, f"instance {i} reports more requests than were dispatched to it"
        pending = self._pending.setdefault(i, deque())
        while pending and pending[0].seq <= state.num_added:
            pending.popleft()
        if i not in self._states:
            self._ids = None
        self._states[i] = state
        self.prefix.update(state)
        self._effective.pop(i, None)

    def remove(self, instance_id: int) -> None:
        """The instance is gone (it died, or finished draining)."""
        for d in (self._states, self._pending, self._sent, self._effective):
            d.pop(instance_id, None)
        self._ids = None
        self.draining.discard(instance_id)
        self.prefix.remove(instance_id)

    def drain(self, instance_id: int) -> None:
        """Take no more requests there and migrate its requests away (scale-in, planned failover)."""
        self.draining.add(instance_id)
        self._effective.pop(instance_id, None)

    @property
    def instance_ids(self) -> list[int]:
        if self._ids is None:
            self._ids = sorted(self._states)
        return list(self._ids)

    def dispatchable(self) -> list[int]:
        """Instances that take new requests (not draining), in id order."""
        ids = self.instance_ids
        return [i for i in ids if i not in self.draining] if self.draining else ids

    def busy(self) -> set[int]:
        """Instances in a migration (either side): at most one at a time each."""
        return {i for pair in self.migrations.values() for i in pair}

    # ---- states --------------------------------------------------------------------------------------
    def state(self, instance_id: int) -> InstanceState:
        """The last snapshot with the dispatches made since added to its queue."""
        s = self._effective.get(instance_id)
        if s is not None:
            return s
        s = self._states[instance_id]
        pending = self._pending[instance_id]
        draining = s.draining or instance_id in self.draining
        if pending or draining != s.draining:
            s = dataclasses.replace(
                s,
                num_waiting=s.num_waiting + len(pending),
                hol_demand_blocks=s.hol_demand_blocks if s.num_waiting or not pending else pending[0].blocks,
                waiting_demand_blocks=s.waiting_demand_blocks + sum(d.blocks for d in pending),
                uncomputed_prefill_tokens=s.uncomputed_prefill_tokens + sum(d.tokens for d in pending),
                num_high_priority=s.num_high_priority + sum(d.high_priority for d in pending),
                draining=draining,
                stored_hashes=[],
                evicted_hashes=[],
                hashes_whole=False,
            )
        self._effective[instance_id] = s
        return s

    def num_pending(self, instance_id: int) -> int:
        return len(self._pending[instance_id])

    def dispatched(self, instance_id: int, req: Request, hashes: list[BlockHash] | None = None) -> None:
        """Count a request sent to an instance at once (call before or right after add_request). With
        its prompt's block hashes (prefix-aware routers), it counts the prefill the instance's cache will
        not serve, and the hashes join the instance's mirrored index."""
        self._sent[instance_id] += 1
        tokens = req.num_tokens
        if hashes:
            tokens -= self.prefix.matched_blocks(instance_id, hashes) * self.block_size
            self.prefix.dispatched(instance_id, hashes)
        self._pending[instance_id].append(
            _Dispatch(
                self._sent[instance_id],
                cdiv(req.num_tokens, self.block_size),
                tokens,
                req.priority < 0,
            )
        )
        self._effective.pop(instance_id, None)
        self.num_dispatched += 1
