"""Offline batches with global prefix sharing (BatchLLM, arXiv 2412.03594).

Waiting requests run in the order of a global plan (`batch_plan`: a prefix tree over every known
request, groups at shared prefixes, groups by decode/prompt ratio), replanned when requests arrive.
A group's prefix is computed once and held: its first member computes it while the other members wait
(admitted together they would each compute the part not yet scheduled), then they are admitted back to
back and hit it, and the projection keeps the prefix's blocks reserved until the group's last member
finishes, so admissions never need to evict it. Memory-centric admission: requests are admitted while
the projected KV (held prefixes, plus each running request's prompt and expected decode growth: its
max_tokens, or `expected_output_len` when it sets none) stays under `kv_fraction` of the pool.

Never stuck: with nothing running, the head of the plan is admitted whatever the projection says, and a
prefix too large to hold (over half the allowed blocks) is not held, its members run as if unshared.

policy_args: kv_fraction (default 0.9), expected_output_len (256), group_order ("ratio" or "trie").
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from quanta.config import SchedulerConfig
from quanta.kv.block_pool import BlockHash
from quanta.request import Request
from quanta.sched.batch_plan import plan_batch, reusable_blocks
from quanta.sched.policy import Policy, register
from quanta.sched.queue import SortedQueue, WaitingQueue

if TYPE_CHECKING:
    from quanta.kv.manager import KVCacheManager

GroupKey = BlockHash | str  # a shared prefix's last block hash, or the id of a request that shares nothing


class PlanQueue(SortedQueue):
    """Waiting requests in plan order; `reorder` re-sorts them after a replan."""

    def reorder(self) -> None:
        reqs = list(self._requests)
        self._key_of.clear()
        pairs = sorted(((self.key(r), r) for r in reqs), key=lambda p: p[0])
        self._keys = [k for k, _ in pairs]
        self._requests = [r for _, r in pairs]


@register
class BatchPolicy(Policy):
    name = "batch"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        args = config.policy_args
        self.kv_fraction = float(args.get("kv_fraction", 0.9))
        self.expected_output_len = int(args.get("expected_output_len", 256))
        self.group_order = str(args.get("group_order", "ratio"))
        if not 0.0 < self.kv_fraction <= 1.0:
            raise ValueError(f"kv_fraction must be in (0, 1], got {self.kv_fraction}")
        if self.expected_output_len < 1:
            raise ValueError(f"expected_output_len must be at least 1, got {self.expected_output_len}")
        if self.group_order not in ("ratio", "trie"):
            raise ValueError(f"group_order must be 'ratio' or 'trie', got {self.group_order!r}")
        self._kv: KVCacheManager | None = None
        self._limit = math.inf  # blocks the projection may reach
        self._known: dict[str, Request] = {}  # unfinished requests, in arrival order
        self._dirty = False  # requests arrived since the last plan
        self._rank: dict[str, int] = {}  # request id -> place in the plan
        self._group_of: dict[str, GroupKey] = {}
        self._prefix: dict[GroupKey, int] = {}  # group -> shared prefix blocks
        self._members_left: Counter[GroupKey] = Counter()  # unfinished requests per group
        self._running: Counter[GroupKey] = Counter()  # running members per group
        self._held: dict[GroupKey, int] = {}  # group -> prefix blocks reserved in the projection
        self._charged: dict[str, tuple[GroupKey, int]] = {}  # running request -> (group, own blocks)
        self._projected = 0  # blocks: held prefixes plus the running requests' own projections
        self._queue = PlanQueue(lambda r: self._rank.get(r.request_id, math.inf))

    # ---- plan ------------------------------------------------------------------------------------
    def attach(self, kv: KVCacheManager) -> None:
        self._kv = kv
        self._limit = self.kv_fraction * kv.num_blocks

    def new_queue(self) -> WaitingQueue:
        return self._queue

    def _expected_decode(self, req: Request) -> int:
        room = self.config.max_model_len - req.num_prompt_tokens
        return min(req.sampling_params.max_tokens or self.expected_output_len, room)

    def _replan(self) -> None:
        kv = self._kv
        assert kv is not None, "the scheduler attaches the KV cache first"
        reqs = list(self._known.values())
        bs = kv.block_size
        # The KV manager's own chains (salt, tenant included): the plan's groups are the cache's hits.
        hashes = [kv.block_hashes(r)[: reusable_blocks(r.num_prompt_tokens, bs)] for r in reqs]
        running = (k for k, n in self._running.items() if n > 0)
        held = frozenset(k for k in (*self._held, *running) if not isinstance(k, str))
        plan = plan_batch(
            hashes,
            [r.num_prompt_tokens for r in reqs],
            bs,
            [self._expected_decode(r) for r in reqs],
            self.group_order,
            first_groups=held,
        )
        self._rank = {reqs[i].request_id: pos for pos, i in enumerate(plan.order)}
        self._group_of.clear()
        self._members_left.clear()
        for g in plan.groups:
            for i in g.members:
                rid = reqs[i].request_id
                key: GroupKey = g.prefix_hash if g.prefix_hash is not None else rid
                self._group_of[rid] = key
                self._prefix[key] = g.prefix_blocks
                self._members_left[key] += 1
        for key in list(self._held):
            self._release_if_done(key)
        self._queue.reorder()
        self._dirty = False

    def _shared(self, key: GroupKey) -> bool:
        """Whether the group's prefix is computed once and held (not when it could crowd out the rest)."""
        n = self._prefix.get(key, 0)
        return n > 0 and self._kv is not None and self._kv.enable_caching and 2 * n <= self._limit

    def _own_blocks(self, req: Request, key: GroupKey) -> int:
        assert self._kv is not None
        bs = self._kv.block_size
        tokens = max(req.num_tokens, req.num_prompt_tokens + self._expected_decode(req))
        own = -(-tokens // bs)
        if self._kv.block_groups:  # a request's blocks grow in whole groups (when the room is there)
            own = -(-own // self._kv.GROUP) * self._kv.GROUP
        return own - self._prefix[key] if self._shared(key) else own

    def _computing_prefix(self, key: GroupKey) -> bool:
        """A running member is still scheduling the group's prefix: others would compute it again."""
        if not self._shared(key) or not self._running[key]:
            return False
        assert not isinstance(key, str) and self._kv is not None
        return self._kv.pool.lookup(key) is None

    def _release_if_done(self, key: GroupKey) -> None:
        if self._members_left[key] <= 0 and self._running[key] <= 0:
            self._members_left.pop(key, None)
            self._running.pop(key, None)
            self._projected -= self._held.pop(key, 0)

    # ---- decisions -----------------------------------------------------------------------------------
    def waiting_order(self, waiting: WaitingQueue, now: float) -> Iterator[Request]:
        if self._dirty:
            self._replan()
        return self._admissible(waiting)

    def _admissible(self, waiting: WaitingQueue) -> Iterator[Request]:
        blocked: set[GroupKey] = set()
        for req in waiting:  # plan order
            key = self._group_of[req.request_id]
            if key in blocked:
                continue
            if self._computing_prefix(key):
                blocked.add(key)  # later groups go ahead meanwhile: they keep the batch full
                continue
            need = self._own_blocks(req, key)
            if self._shared(key) and key not in self._held:
                need += self._prefix[key]
            if self._charged and self._projected + need > self._limit:
                return  # keep the plan's order; with nothing running the head always goes
            yield req

    # ---- accounting --------------------------------------------------------------------------------
    def on_arrival(self, req: Request) -> None:
        self._known[req.request_id] = req
        self._dirty = True

    def on_admit(self, req: Request, now: float) -> None:
        if self._dirty:  # a request migrated in is admitted on arrival, without a waiting_order to plan it
            self._replan()
        key = self._group_of[req.request_id]
        own = self._own_blocks(req, key)
        self._charged[req.request_id] = (key, own)
        self._projected += own
        self._running[key] += 1
        if self._shared(key) and key not in self._held:
            self._held[key] = self._prefix[key]
            self._projected += self._held[key]

    def _uncharge(self, req: Request) -> GroupKey | None:
        charged = self._charged.pop(req.request_id, None)
        if charged is None:
            return None
        key, own = charged
        self._projected -= own
        self._running[key] -= 1
        return key

    def on_preempt(self, req: Request) -> None:
        self._uncharge(req)  # its group stays held: it comes back first

    def on_finish(self, req: Request) -> None:
        self._known.pop(req.request_id, None)
        self._rank.pop(req.request_id, None)
        charged_key = self._uncharge(req)
        key = self._group_of.pop(req.request_id, None)
        if key is not None:
            self._members_left[key] -= 1
            self._release_if_done(key)
        if charged_key is not None and charged_key != key:
            self._release_if_done(charged_key)
        assert self._projected >= 0 and (self._charged or self._projected == sum(self._held.values()))
