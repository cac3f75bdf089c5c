"""Autellix PLAS (program-level attained service, arXiv 2502.13965): least-served programs first.

A call is ranked by the service its program has already received: the serving time (first scheduled
to finished) of the program's earlier calls, so a long agent program does not hold back short ones, and
nothing needs to know a program's length in advance. Calls sit in multi-level queues: level 0 below
`quantum_s` of attained service, and each level up holds `base` times more; FCFS inside a level. A call
whose wait exceeds `starvation_ratio` times its program's service (at least one quantum) is promoted to
the front, so long programs are delayed, never starved; once admitted it runs as level 0 (no level-0
call preempts it). Preemptive (the default): a waiting call short of room evicts running calls of
more-served levels (the most-served first).

Options (policy_args): quantum_s (1.0), base (4), levels (6), starvation_ratio (8), preemptive (true).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from quanta.config import SchedulerConfig
from quanta.request import Request, RequestStatus
from quanta.sched.bounded import RecentDict
from quanta.sched.policy import Policy, register
from quanta.sched.queue import ClassQueue, WaitingQueue


@register
class PLASPolicy(Policy):
    name = "plas"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        args = config.policy_args
        self.quantum = float(args.get("quantum_s", 1.0))
        self.base = float(args.get("base", 4.0))
        self.levels = int(args.get("levels", 6))
        self.starvation_ratio = float(args.get("starvation_ratio", 8.0))
        self.preemptive = bool(args.get("preemptive", True))
        if self.quantum <= 0 or self.base <= 1 or self.levels < 1 or self.starvation_ratio <= 0:
            raise ValueError("plas needs quantum_s > 0, base > 1, levels >= 1, starvation_ratio > 0")
        self.service: dict[str, float] = RecentDict()  # program -> attained service (s); bounded
        self._level: dict[str, int] = {}  # request id -> its level, fixed while it waits
        self._starved: set[str] = set()  # calls waiting_order last put at the front
        # Calls admitted through the starvation guard: they run as level 0 (no level-0 call preempts
        # them; each preemption would only recompute them, one token gained per admission).
        self._promoted: set[str] = set()

    def attained(self, req: Request) -> float:
        program = req.program
        return 0.0 if program is None else self.service.get(program, 0.0)

    def level_of(self, service: float) -> int:
        if service < self.quantum:
            return 0
        return min(1 + int(math.log(service / self.quantum, self.base)), self.levels - 1)

    def new_queue(self) -> ClassQueue:
        return ClassQueue(lambda r: self._level[r.request_id])

    def on_arrival(self, req: Request) -> None:
        self._level[req.request_id] = self.level_of(self.attained(req))

    def on_admit(self, req: Request, now: float) -> None:
        if req.request_id in self._starved:
            self._promoted.add(req.request_id)

    def on_preempt(self, req: Request) -> None:
        self._promoted.discard(req.request_id)  # back in its queue: promoted again if still starved

    def _running_level(self, req: Request) -> int:
        return 0 if req.request_id in self._promoted else self._level.get(req.request_id, 0)

    def on_finish(self, req: Request) -> None:
        self._level.pop(req.request_id, None)
        self._promoted.discard(req.request_id)
        self._starved.discard(req.request_id)
        program = req.program
        if program is None:
            return
        if req.final_turn or req.status == RequestStatus.FINISHED_ABORTED:
            self.service.pop(program, None)
            return
        t = req.times
        if t.first_scheduled is not None and t.finished is not None:
            self.service[program] = self.service.get(program, 0.0) + t.finished - t.first_scheduled

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        # The most-served level, latest admitted within it.
        return max(reversed(candidates), key=self._running_level)

    def may_preempt(self, waiting: Request, running: Request, now: float) -> bool:
        return self.preemptive and self._level[waiting.request_id] < self._running_level(running)

    def waiting_order(self, waiting: WaitingQueue, now: float) -> Iterator[Request]:
        assert isinstance(waiting, ClassQueue)
        starved = []
        for level, q in waiting.classes().items():
            if level == 0:
                continue
            # A level holds programs with at least this much service: a call that has not waited
            # starvation_ratio times it cannot be starved, nor can any call behind it (FCFS).
            floor = self.starvation_ratio * self.quantum * self.base ** (level - 1)
            for r in q:
                wait = now - r.arrival_time
                if wait <= floor:
                    break
                if wait > self.starvation_ratio * max(self.attained(r), self.quantum):
                    starved.append(r)
        self._starved = skip = {r.request_id for r in starved}
        yield from starved
        merged = waiting.merged(key=lambda r: (self._level[r.request_id], waiting.key(r)))
        yield from (r for r in merged if r.request_id not in skip)
