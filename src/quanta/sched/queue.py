"""Waiting queues. A policy picks the queue that yields waiting requests in its order cheaply: the
scheduler consults the order every step, so a queue keeps it incrementally rather than sorting all
waiting requests each time."""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Protocol

from quanta.request import Request

QueueKey = tuple[float, int]  # (rank, tie-breaking sequence number)


class WaitingQueue(Protocol):
    """What the scheduler needs of a waiting queue; its iteration order does not matter (policies give
    the admission order through `Policy.waiting_order`)."""

    def add(self, req: Request) -> None: ...
    def remove(self, req: Request) -> None: ...
    def forget(self, req: Request) -> None: ...
    def __iter__(self) -> Iterator[Request]: ...
    def __len__(self) -> int: ...
    def __contains__(self, req: Request) -> bool: ...


class SortedQueue:
    """Ordered by a rank fixed when a request first enters (ties: first come first); a preempted
    request re-enters at its original place. Iteration is the order: nothing to sort per step."""

    def __init__(self, rank: Callable[[Request], float]) -> None:
        self._rank = rank
        self._keys: list[QueueKey] = []
        self._requests: list[Request] = []
        self._key_of: dict[str, QueueKey] = {}
        self._seq = itertools.count()

    def key(self, req: Request) -> QueueKey:
        """The request's place, remembered across preemptions."""
        key = self._key_of.get(req.request_id)
        if key is None:
            key = self._key_of[req.request_id] = (self._rank(req), next(self._seq))
        return key

    def add(self, req: Request) -> None:
        key = self.key(req)
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


class FCFSQueue(SortedQueue):
    """Ordered by arrival time; a preempted request re-enters at its original place (near the front)."""

    def __init__(self) -> None:
        super().__init__(lambda r: r.arrival_time)


class ClassQueue:
    """One FCFS queue per class (e.g. priority level). A policy merges the classes' heads lazily with
    `merged`, so finding the next request costs O(log classes), not a sort of the whole queue."""

    def __init__(self, class_of: Callable[[Request], object]) -> None:
        self._class_of = class_of
        self._classes: dict[object, FCFSQueue] = {}
        self._places = FCFSQueue()  # remembers each request's arrival place, whatever its class
        self._len = 0

    def key(self, req: Request) -> QueueKey:
        return self._places.key(req)

    def _queue(self, req: Request) -> FCFSQueue:
        c = self._class_of(req)
        q = self._classes.get(c)
        if q is None:
            q = self._classes[c] = FCFSQueue()
            q._key_of = self._places._key_of
            q._seq = self._places._seq
        return q

    def add(self, req: Request) -> None:
        self._queue(req).add(req)
        self._len += 1

    def remove(self, req: Request) -> None:
        c = self._class_of(req)
        q = self._classes[c]
        q.remove(req)
        self._len -= 1
        if not len(q):
            del self._classes[c]  # tenants come and go: keep only classes with requests

    def forget(self, req: Request) -> None:
        self._places.forget(req)

    def classes(self) -> dict[object, FCFSQueue]:
        """Each class's FCFS queue (some may be empty)."""
        return self._classes

    def merged(self, key: Callable[[Request], object]) -> Iterator[Request]:
        """All waiting requests by `key`, which must not decrease along each class's FCFS order."""
        return heapq.merge(*(q for q in self._classes.values() if len(q)), key=key)

    def __iter__(self) -> Iterator[Request]:
        return itertools.chain.from_iterable(self._classes.values())

    def __len__(self) -> int:
        return self._len

    def __contains__(self, req: Request) -> bool:
        q = self._classes.get(self._class_of(req))
        return q is not None and req in q
