"""round-robin: each request to the next instance that takes requests, in turn."""

from __future__ import annotations

from quanta.cluster.router import Router, register
from quanta.cluster.view import ClusterView
from quanta.request import Request


@register
class RoundRobinRouter(Router):
    name = "round-robin"
    reads_state = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._last = -1

    def choose(self, req: Request, view: ClusterView) -> int:
        ids = view.dispatchable()
        i = next((i for i in ids if i > self._last), ids[0])  # the next id after the last one, cyclically
        self._last = i
        return i
