"""Strict priority classes with preemption and aging.

A lower `priority` value is more important (vLLM's convention). Waiting requests run class by class,
FCFS inside a class; a preempted request keeps its place in its class (the queue remembers it). When
the head of the queue lacks KV blocks or a sequence slot, running requests of lower classes are
preempted for it, lowest class and latest arrival first. Aging: every `aging_s` seconds of age lifts a
request one class, so low priority is delayed, never starved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.policy import Policy, register
from quanta.sched.queue import FCFSQueue


@register
class PriorityPolicy(Policy):
    name = "priority"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.aging_s = float(config.policy_args.get("aging_s", 60.0))
        if self.aging_s <= 0:
            raise ValueError(f"aging_s must be positive, got {self.aging_s}")
        self._now = 0.0

    def level(self, req: Request, now: float) -> int:
        """The request's class after aging (lower runs first)."""
        return req.priority - int(max(now - req.arrival_time, 0.0) / self.aging_s)

    def waiting_order(self, waiting: FCFSQueue, now: float) -> Iterator[Request]:
        self._now = now
        return iter(sorted(waiting, key=lambda r: self.level(r, now)))  # stable: FCFS inside a class

    def running_order(self, running: list[Request], now: float) -> Iterable[Request]:
        self._now = now
        return sorted(running, key=lambda r: self.level(r, now))

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        return max(reversed(candidates), key=lambda r: (self.level(r, self._now), r.arrival_time))

    def may_preempt(self, waiting: Request, running: Request, now: float) -> bool:
        return self.level(running, now) > self.level(waiting, now)
