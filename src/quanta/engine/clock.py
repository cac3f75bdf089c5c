"""Clocks: the engine reads time only through these, so the same loop runs in real or virtual time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def advance(self, seconds: float) -> None:
        """Account for a step that took `seconds` (real time passes by itself)."""
        ...


class WallClock:
    def __init__(self) -> None:
        self._origin = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._origin

    def advance(self, seconds: float) -> None:
        pass


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        assert seconds >= 0.0, "time cannot run backwards"
        self._t += seconds
