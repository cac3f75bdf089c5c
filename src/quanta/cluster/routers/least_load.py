"""least-load: the instance with the lowest load (default: outstanding requests; `metric` picks one of
quanta.cluster.load.LOADS), the first of equals."""

from __future__ import annotations

from quanta.cluster.load import LOADS
from quanta.cluster.router import Router, register
from quanta.cluster.view import ClusterView
from quanta.request import Request


@register
class LeastLoadRouter(Router):
    name = "least-load"

    def __init__(self, metric: str = "requests", seed: int = 0) -> None:
        super().__init__(seed)
        if metric not in LOADS:
            raise ValueError(f"unknown load metric {metric!r}; choose from {', '.join(LOADS)}")
        self.load = LOADS[metric]
        self.reads_kv = metric in ("kv", "tokens")  # type: ignore[misc]  (per instance: the metric decides)

    def choose(self, req: Request, view: ClusterView) -> int:
        return min(view.dispatchable(), key=lambda i: self.load(view.state(i)))
