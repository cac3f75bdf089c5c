"""Waiting queues. A policy picks the queue that yields waiting requests in its order."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from quanta.request import Request


class FCFSQueue:
    """Ordered by arrival time; a preempted request re-enters at its original place (near the front)."""

    def __init__(self) -> None:
        self._keys: list[tuple[float, int]] = []
        self._requests: list[Request] = []
        self._key_of: dict[str, tuple[float, int]] = {}
        self._seq = itertools.count()

    def _key(self, req: Request) -> tuple[float, int]:
        key = self._key_of.get(req.request_id)
        if key is None:
            key = self._key_of[req.request_id] = (req.arrival_time, next(self._seq))
        return key

    def add(self, req: Request) -> None:
        key = self._key(req)
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._requests.insert(i, req)

    def remove(self, req: Request) -> None:
        key = self._key_of[req.request_id]
        i = bisect.bisect_left(self._keys, key)
        assert self._requests[i] is req, f"{req.request_id} is not waiting"
        del self._keys[i]
        del self._requests[i]

    def forget(self, req: Request) -> None:
        """Drop the remembered place of a request that has left the engine."""
        self._key_of.pop(req.request_id, None)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, req: Request) -> bool:
        key = self._key_of.get(req.request_id)
        if key is None:
            return False
        i = bisect.bisect_left(self._keys, key)
        return i < len(self._requests) and self._requests[i] is req
