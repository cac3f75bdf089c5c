"""Where a simulation's requests come from: an open-loop trace, or a closed-loop source (agent
programs, `quanta.sim.programs.ProgramSource`) whose next arrivals depend on when calls finish."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Protocol

from quanta.request import Request


class ArrivalSource(Protocol):
    output_lengths: Mapping[str, int]  # request id -> true output length, for the SimExecutors

    def next_arrival_time(self) -> float: ...  # math.inf when nothing is pending (yet)
    def pop(self) -> Request: ...
    def on_finished(self, req: Request, t: float) -> None: ...


class TraceSource:
    """Open loop: requests of a trace, in arrival order, whatever happens to earlier ones."""

    def __init__(self, requests: Iterator[Request], output_lengths: Mapping[str, int]) -> None:
        self.output_lengths = output_lengths
        self._requests = requests
        self._next = next(requests, None)

    def next_arrival_time(self) -> float:
        return math.inf if self._next is None else self._next.arrival_time

    def pop(self) -> Request:
        req = self._next
        assert req is not None, "no request is pending"
        self._next = next(self._requests, None)
        return req

    def on_finished(self, req: Request, t: float) -> None:
        pass
