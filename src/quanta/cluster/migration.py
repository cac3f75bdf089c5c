"""Live migration of one running request, as a pure state machine (Llumnix's multi-stage pre-copy).

    RESERVE    the destination pre-allocates the blocks the request holds now
    STAGE_OUT  the source reads the blocks filled since the last stage (not the one being written); the
               request keeps decoding there meanwhile
    STAGE_IN   the destination writes them (its reservation grows as needed)
               ... repeated until few blocks remain (`last_stage_blocks`) or `max_stages` is reached
    LAST_OUT   the source stops the request, reads the rest and snapshots it (downtime starts)
    COMMIT     the destination writes the rest and commits: the request decodes there; the source frees
               its copy (downtime ends)
    DONE | ABORTED

Abort rules: the request finishes, is aborted or preempted before the last stage -> the destination
frees its reservation, nothing else changes; the destination cannot allocate or a copy fails before the
last stage -> the same (the source still runs the request); the commit fails -> the source takes the
request back and the destination frees; the request was aborted at the source while stopped -> the
destination's copy is aborted too. A destination whose source died frees the reservation by its
watchdog (MigrationEndpoint.watchdog).

`advance(src, dst, now)` performs one phase through the two endpoints (MigrationEndpoint, or a proxy
whose methods make the same calls remotely) and returns the transfer time of the copy it started, as the
endpoints' transport prices it: a simulator schedules the next phase that much later, while the source
keeps stepping, and passes its virtual time. Real drivers call it between engine steps and pass a clock
function (e.g. time.perf_counter): then the downtime also covers the commit call itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from quanta.cluster.endpoint import StageOut


class Phase(enum.Enum):
    RESERVE = "reserve"
    STAGE_OUT = "stage_out"
    STAGE_IN = "stage_in"
    LAST_OUT = "last_out"
    COMMIT = "commit"
    DONE = "done"
    ABORTED = "aborted"


class Endpoint(Protocol):
    """What the state machine calls on each side (MigrationEndpoint's methods, maybe remote)."""

    def reserve(self, request_id: str, num_blocks: int) -> bool: ...
    def stage_out(self, request_id: str, start_block: int, last: bool) -> StageOut: ...
    def stage_in(self, request_id: str, out: StageOut) -> bool: ...
    def abort_in(self, request_id: str) -> None: ...
    def finish_out(self, request_id: str, committed: bool) -> bool: ...
    def abort(self, request_ids: list[str]) -> None: ...


@dataclass(slots=True)
class Migration:
    request_id: str
    src: int  # instance ids
    dst: int
    num_blocks: int  # blocks to pre-allocate (the request's, when chosen)
    max_stages: int = 3  # the last included
    last_stage_blocks: int = 4  # stop and copy the rest once at most this many blocks are left
    seconds: Any = None  # bytes -> transfer seconds (the transport's `seconds`); None: 0
    phase: Phase = Phase.RESERVE
    next_block: int = 0  # blocks [0, next_block) are on the destination
    num_stages: int = 0
    reason: str = ""  # why it aborted (or how it ended)
    started: float | None = None
    stopped_at: float | None = None  # the source stopped the request (last stage)
    downtime: float | None = None  # from the stop to the commit
    bytes_moved: int = 0
    _out: StageOut | None = None

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.ABORTED)

    @property
    def committed(self) -> bool:
        return self.phase == Phase.DONE and self.reason == "committed"

    def _abort(self, dst: Endpoint, reason: str) -> float:
        dst.abort_in(self.request_id)
        self.phase = Phase.ABORTED
        self.reason = reason
        return 0.0

    def _price(self, out: StageOut) -> float:
        self.bytes_moved += out.nbytes
        return self.seconds(out.nbytes) if self.seconds is not None else 0.0

    def advance(self, src: Endpoint, dst: Endpoint, now: float | Callable[[], float]) -> float:
        """Carry out the current phase at time `now` (a reading, or a clock to read); returns the seconds
        its copy takes (0: none started)."""
        clock = now if callable(now) else None
        now = now() if callable(now) else now
        rid, phase = self.request_id, self.phase
        assert not self.finished, f"migration of {rid} is over ({self.reason})"
        if self.started is None:
            self.started = now
        if phase == Phase.RESERVE:
            if not dst.reserve(rid, self.num_blocks):
                return self._abort(dst, "destination full")
            self.phase = Phase.STAGE_OUT
            return 0.0
        if phase in (Phase.STAGE_OUT, Phase.LAST_OUT):
            last = phase == Phase.LAST_OUT
            try:
                out = src.stage_out(rid, self.next_block, last)
            except Exception as e:  # the source's read or send failed: it still holds the request
                try:
                    src.finish_out(rid, committed=False)
                finally:  # a dead source raises again: the destination's reservation goes all the same
                    self._abort(dst, f"copy failed: {e}")
                return 0.0
            if not out.ok:
                return self._abort(dst, "request left the source")
            self._out = out
            if last:
                self.stopped_at = now
            self.phase = Phase.COMMIT if last else Phase.STAGE_IN
            return self._price(out)
        out = self._out
        assert out is not None
        self._out = None
        try:
            ok = dst.stage_in(rid, out)
        except Exception as e:
            ok, why = False, f"copy failed: {e}"
        else:
            why = "destination full"
        if phase == Phase.STAGE_IN:
            if not ok:
                return self._abort(dst, why)
            self.next_block = out.start_block + out.num_blocks
            self.num_stages += 1
            left = out.total_blocks - self.next_block
            done_early = left <= self.last_stage_blocks or self.num_stages >= self.max_stages - 1
            self.phase = Phase.LAST_OUT if done_early else Phase.STAGE_OUT
            return 0.0
        assert phase == Phase.COMMIT
        self.num_stages += 1
        if not ok:
            try:
                src.finish_out(rid, committed=False)  # the source takes the request back
            finally:
                self._abort(dst, why)
            return 0.0
        assert self.stopped_at is not None
        self.downtime = (clock() if clock is not None else now) - self.stopped_at
        self.phase = Phase.DONE
        # Committed on the destination: so it stays if the source dies before it hears (it raises).
        self.reason = "committed"
        if not src.finish_out(rid, committed=True):  # aborted by the client while stopped: its copy goes too
            dst.abort([rid])
            self.reason = "aborted while stopped"
        return 0.0
