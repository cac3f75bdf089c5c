"""LocalCluster: instances in one process under one controller (tests, offline use, the CPU benchmark).

Each `step()` steps every instance that has work once, then advances each migration in flight by one
phase (so a source decodes between stages, as a remote one would), then polls snapshots and asks the
rescheduler for new migrations. The Ray runtime runs the same Migration / Router / Rescheduler code
with actor proxies in place of these endpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from quanta.cluster.endpoint import MigrationEndpoint
from quanta.cluster.migration import Migration
from quanta.cluster.rescheduler import Rescheduler
from quanta.cluster.router import Router, dispatch, make_router
from quanta.cluster.transport import InProcessTransport, KVTransport
from quanta.cluster.view import ClusterView
from quanta.engine.core import EngineCore, StepOutput
from quanta.request import Request


class LocalCluster:
    def __init__(
        self,
        cores: Sequence[EngineCore],
        router: Router | str = "least-load",
        rescheduler: Rescheduler | None = None,
        transport: KVTransport | None = None,
        clock: Callable[[], float] = time.perf_counter,
        max_stages: int = 3,
        last_stage_blocks: int = 4,
    ) -> None:
        assert cores, "a cluster needs an instance"
        self.transport = transport or InProcessTransport()
        self.endpoints = [MigrationEndpoint(c, self.transport, i) for i, c in enumerate(cores)]
        self.router = make_router(router) if isinstance(router, str) else router
        self.rescheduler = rescheduler
        self.view = ClusterView(cores[0].kv.block_size, cores[0].kv.per_tenant, cores[0].kv.hash_algo)
        self.clock = clock
        self.max_stages = max_stages
        self.last_stage_blocks = last_stage_blocks
        self.owner: dict[str, int] = {}  # request id -> instance that runs it
        self.migrations: dict[str, Migration] = {}  # in flight
        self.done: list[Migration] = []
        self.step_observers: list[Callable[[int, StepOutput], None]] = []  # (instance, step)
        self.poll()

    @property
    def cores(self) -> list[EngineCore]:
        return [ep.core for ep in self.endpoints]

    def poll(self) -> None:
        for ep in self.endpoints:
            self.view.update(ep.state())

    def add_request(self, req: Request, instance: int | None = None) -> int:
        i = dispatch(self.router, self.view, req) if instance is None else instance
        if instance is not None:
            self.view.dispatched(i, req)
        self.endpoints[i].core.add_request(req)
        self.owner[req.request_id] = i
        return i

    def abort(self, request_id: str) -> None:
        """A client abort reaches the owner and, while migrating, the destination."""
        m = self.migrations.get(request_id)
        targets = {self.owner.get(request_id)} | ({m.dst} if m is not None else set())
        for i in targets - {None}:
            self.endpoints[i].abort([request_id])  # type: ignore[index]

    def migrate(self, request_id: str, dst: int) -> Migration:
        """Start migrating a running request to instance `dst` (it advances with `step`)."""
        src = self.owner[request_id]
        assert src != dst and request_id not in self.migrations
        blocks = len(self.endpoints[src].core.kv.req_blocks.get(request_id, ()))
        m = Migration(
            request_id,
            src,
            dst,
            blocks,
            self.max_stages,
            self.last_stage_blocks,
            seconds=self.transport.seconds,
        )
        self.migrations[request_id] = m
        self.view.migrations[request_id] = (src, dst)
        return m

    def advance_migrations(self) -> None:
        for rid, m in list(self.migrations.items()):
            m.advance(self.endpoints[m.src], self.endpoints[m.dst], self.clock)
            if m.finished:
                del self.migrations[rid]
                del self.view.migrations[rid]
                if m.committed:
                    self.owner[rid] = m.dst
                self.done.append(m)

    def step(self) -> None:
        for i, ep in enumerate(self.endpoints):
            if ep.core.has_unfinished():
                out = ep.core.step()
                for observe in self.step_observers:
                    observe(i, out)
        self.advance_migrations()
        self.poll()
        if self.rescheduler is not None:
            for order in self.rescheduler.plan(self.view):
                self.migrate(order.request_id, order.dst)

    def has_unfinished(self) -> bool:
        return bool(self.migrations) or any(ep.core.has_unfinished() for ep in self.endpoints)

    def run_to_end(self, max_steps: int = 100_000) -> int:
        n = 0
        while self.has_unfinished():
            self.step()
            n += 1
            assert n < max_steps, "the cluster made no progress"
        return n
