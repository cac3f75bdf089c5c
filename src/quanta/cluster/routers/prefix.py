"""prefix: cost = the request's prefill tokens the instance would not serve from its prefix cache (an
exact per-instance hash index, ClusterView.prefix) + lam * the prefill tokens already queued there.
Two guards keep a popular prefix from piling requests onto one instance: only instances whose
outstanding requests are within `guard` of the least loaded one compete, and among those only the ones
with free KV for this request on top of their queue's (when any has it): a cache hit is worth less than
the preemptions an overfull instance would pay for it."""

from __future__ import annotations

from quanta.cluster.load import request_load
from quanta.cluster.router import Router, register
from quanta.cluster.view import ClusterView
from quanta.kv.block_pool import BlockHash
from quanta.kv.manager import cdiv
from quanta.request import Request


@register
class PrefixRouter(Router):
    name = "prefix"
    reads_kv = True

    def __init__(self, lam: float = 4.0, guard: float = 8.0, seed: int = 0) -> None:
        super().__init__(seed)
        self.lam = lam
        self.guard = guard
        self._hashes: tuple[str, list[BlockHash]] | None = None  # the last request's, computed once

    def hashes(self, req: Request, view: ClusterView) -> list[BlockHash]:
        if self._hashes is None or self._hashes[0] != req.request_id:
            self._hashes = (req.request_id, view.prefix.request_hashes(req))
        return self._hashes[1]

    def choose(self, req: Request, view: ClusterView) -> int:
        ids = view.dispatchable()
        loads = {i: request_load(view.state(i)) for i in ids}
        least = min(loads.values())
        hashes = self.hashes(req, view)
        bs = view.block_size
        need = cdiv(req.num_tokens, bs)
        near = [i for i in ids if loads[i] <= least + self.guard]

        def room(i: int) -> bool:
            # Blocks the request adds: its cached prefix is counted in the instance's own demand already
            # (held by a running turn) or in its free blocks (kept after the last turn finished).
            s = view.state(i)
            new = need - view.prefix.matched_blocks(i, hashes)
            return s.num_free_blocks - s.watermark_blocks - s.waiting_demand_blocks >= new

        roomy = [i for i in near if room(i)]

        def cost(i: int) -> tuple[float, float]:
            uncached = req.num_tokens - view.prefix.matched_blocks(i, hashes) * bs
            # Ties (a new conversation, idle instances) go to the fewest outstanding requests.
            return uncached + self.lam * view.state(i).uncomputed_prefill_tokens, loads[i]

        return min(roomy or near, key=cost)
