"""Clocks: the engine reads time only through these, so the same loop runs in real or virtual time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def advance(self, seconds: float) -> None:
        """Account for a step that took `seconds` (real time passes by itself)."""
        ...

    def wait_until(self, t: float) -> None:
        """Idle until time t (the next arrival): sleep on a wall clock, jump on a virtual one."""
        ...


class WallClock:
    def __init__(self, origin: float | None = None) -> None:
        self._origin = time.monotonic() if origin is None else origin  # time.monotonic() at which now() is 0

    def now(self) -> float:
        return time.monotonic() - self._origin

    def unix_offset(self) -> float:
        """What to add to a reading to get Unix time: a request's timestamps move between engines (live
        migration) through that common frame."""
        return time.time() - self.now()

    def advance(self, seconds: float) -> None:
        pass

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        assert seconds >= 0.0, "time cannot run backwards"
        self._t += seconds

    def wait_until(self, t: float) -> None:
        self._t = max(self._t, t)

    def unix_offset(self) -> float:
        return 0.0  # the virtual clocks of one simulation share one frame
