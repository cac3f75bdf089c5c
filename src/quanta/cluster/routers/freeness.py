"""freeness (Llumnix): the instance with the most virtual free memory per request. For dispatch, every
queued request's demand counts (as Llumnix's dispatch load; only the rescheduler counts the head of the
queue alone): a queue must look as busy as it is, or a burst piles onto it. A high-priority request
(priority < 0) prefers instances holding no other high-priority request (headroom for it)."""

from __future__ import annotations

from quanta.cluster.load import freeness
from quanta.cluster.router import Router, register
from quanta.cluster.view import ClusterView
from quanta.request import Request


@register
class FreenessRouter(Router):
    name = "freeness"
    reads_kv = True

    def __init__(self, priority_headroom_blocks: int = 0, all_waiting: bool = True, seed: int = 0) -> None:
        super().__init__(seed)
        self.headroom = priority_headroom_blocks
        self.all_waiting = all_waiting

    def choose(self, req: Request, view: ClusterView) -> int:
        ids = view.dispatchable()
        if req.priority < 0:
            alone = [i for i in ids if view.state(i).num_high_priority == 0]
            ids = alone or ids
        return max(ids, key=lambda i: freeness(view.state(i), self.headroom, self.all_waiting))
