"""Strict priority classes with preemption and aging.

A lower `priority` value is more important (vLLM's convention). Waiting requests run class by class,
FCFS inside a class; a preempted request keeps its place in its class (the queue remembers it). When
the head of the queue lacks KV blocks, tokens or a sequence slot, running requests of lower classes give
way (lowest class and latest arrival first): they skip a prompt chunk or are preempted. Aging: every
`aging_s` seconds of age lifts a request one class, so low priority is delayed, never starved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.policy import Policy, register
from quanta.sched.queue import ClassQueue, WaitingQueue


@register
class PriorityPolicy(Policy):
    name = "priority"
    steady_decode = True  # on_schedule only records the time; aging matters to waiting requests only

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.aging_s = float(config.policy_args.get("aging_s", 60.0))
        if self.aging_s <= 0:
            raise ValueError(f"aging_s must be positive, got {self.aging_s}")
        self._now = 0.0

    def level(self, req: Request, now: float) -> int:
        """The request's class after aging (lower runs first)."""
        return req.priority - int(max(now - req.arrival_time, 0.0) / self.aging_s)

    def rank(self, req: Request) -> tuple[int, float]:
        """Lower runs first: class after aging, then arrival."""
        return self.level(req, self._now), req.arrival_time

    def new_queue(self) -> ClassQueue:
        return ClassQueue(lambda r: r.priority)

    def on_schedule(self, now: float) -> None:
        self._now = now

    def waiting_order(self, waiting: WaitingQueue, now: float) -> Iterator[Request]:
        assert isinstance(waiting, ClassQueue)
        # Inside a class, older requests have aged as much or more: each class's FCFS order is already in
        # order of level, so merging the classes' heads gives the sorted order lazily.
        return waiting.merged(key=lambda r: (self.level(r, now), waiting.key(r)))

    def prefill_order(self, partial: list[Request], now: float) -> Iterable[Request]:
        return sorted(partial, key=lambda r: self.level(r, now))  # stable: admission order inside a class

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        return max(reversed(candidates), key=self.rank)

    def may_preempt(self, waiting: Request, running: Request, now: float) -> bool:
        return self.level(running, now) > self.level(waiting, now)

    def victim_for(self, waiting: Request, candidates: Sequence[Request], now: float) -> Request | None:
        # Aging only lifts, so no running request sits below its own class: when the waiting request's
        # class is at or below all of theirs, it may preempt none (a pass without the arithmetic).
        if self.level(waiting, now) >= max(r.priority for r in candidates):
            return None
        victim = self.preemption_victim(candidates)  # the lowest class: if not it, none
        return victim if self.may_preempt(waiting, victim, now) else None
