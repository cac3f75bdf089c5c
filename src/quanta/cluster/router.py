"""Routers: where a new request goes. A router is one short file in `quanta.cluster.routers`, registered
by name like the scheduling policies (`make_router(name, **args)`).

A router reads only the `ClusterView` (snapshots plus the dispatches counted since), so the same router
runs in the simulator and behind the Ray cluster. `dispatch` asks it for an instance and counts the
dispatch at once. Class flags tell a simulator what the router reads: `reads_state` (any snapshot) and
`reads_kv` (block counts, prefix hashes: replicas must be brought up to the arrival's time first);
round-robin reads nothing and the request-count least-load no KV state, so runs of decode steps need
not be cut for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from quanta.cluster.view import ClusterView
from quanta.kv.block_pool import BlockHash
from quanta.request import Request


class Router(ABC):
    name: ClassVar[str]
    reads_state: ClassVar[bool] = True  # False: it reads no snapshot at all (round-robin)
    reads_kv: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abstractmethod
    def choose(self, req: Request, view: ClusterView) -> int:
        """The instance for `req`, among `view.dispatchable()` (never empty when called)."""

    def hashes(self, req: Request, view: ClusterView) -> list[BlockHash] | None:
        """Prompt hashes to record as dispatched (prefix-aware routers); None: not tracked."""
        return None

    def forget(self, request_id: str) -> None:
        """A request finished (routers that keep per-request state drop it)."""
        return None  # most routers keep none


class NoInstanceError(RuntimeError):
    """Every instance is draining or gone: the service is unavailable (HTTP 503), not broken."""


def dispatch(router: Router, view: ClusterView, req: Request) -> int:
    """Choose an instance for `req` and count the dispatch there (the caller then adds it there)."""
    if not view.dispatchable():
        raise NoInstanceError("no instance takes requests (all are draining or gone)")
    i = router.choose(req, view)
    assert i in view.dispatchable(), f"router {router.name} chose instance {i}, which takes no requests"
    view.dispatched(i, req, router.hashes(req, view))
    return i


ROUTERS: dict[str, type[Router]] = {}


def register(cls: type[Router]) -> type[Router]:
    ROUTERS[cls.name] = cls
    return cls


def router_names() -> list[str]:
    import quanta.cluster.routers  # noqa: F401  (registers the built-in routers)

    return sorted(ROUTERS)


def make_router(name: str, **args: Any) -> Router:
    import quanta.cluster.routers  # noqa: F401

    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(sorted(ROUTERS))}") from None
    try:
        return cls(**args)
    except TypeError as e:
        raise ValueError(f"router {name}: {e}") from None
