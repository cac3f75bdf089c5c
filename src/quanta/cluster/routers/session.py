"""session: requests of one session (or agent program: `Request.program`, the program_id, else the
session_id) go to the same instance (its prefix cache, and its KV pins, hold the conversation), as long
as it takes requests; new sessions and requests without one go where the
`fallback` router (default least-load) sends them."""

from __future__ import annotations

from quanta.cluster.router import Router, make_router, register
from quanta.cluster.view import ClusterView
from quanta.request import Request
from quanta.sched.bounded import RecentDict


@register
class SessionRouter(Router):
    name = "session"

    def __init__(self, fallback: str = "least-load", seed: int = 0) -> None:
        super().__init__(seed)
        self.fallback = make_router(fallback, seed=seed)
        self.reads_kv = self.fallback.reads_kv  # type: ignore[misc]
        self._owner: dict[str, int] = RecentDict()  # session id -> instance (bounded: the most recent)

    def choose(self, req: Request, view: ClusterView) -> int:
        sid = req.program
        i = self._owner.get(sid) if sid is not None else None
        if i is None or i not in view.dispatchable():
            i = self.fallback.choose(req, view)
        if sid is not None:
            self._owner[sid] = i  # (again: the session is the newest, the last to be forgotten)
        return i
