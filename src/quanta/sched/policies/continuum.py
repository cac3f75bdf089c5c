"""Continuum (arXiv 2511.02230): agent programs keep their KV across tool calls, and run program by program.

When a call of a program ends with a tool call (not its final turn), its KV is pinned for a time-to-live
tau chosen from the tool durations seen so far (that tool's, once it has `min_samples`, else all tools'):
tau = argmax over tau in {0} U observed of P(duration <= tau) * benefit - tau * cost, where the benefit of
a hit is the re-prefill it saves (context tokens * prefill_s_per_token) plus the queueing it saves (the
mean wait so far), and the cost is the pinned share of the pool times mem_price. Fixed mode: ttl_s.
Waiting order: preempted calls first, then calls whose program holds a pin, then program-level FCFS by
the program's first arrival (a program's next turn does not queue behind newer programs).
Tail guards: a call that has waited tail_guard_s may release other programs' pins to be admitted (the
latest program's first), so no call waits unboundedly behind pins; pins also give way before any
running request is preempted (the scheduler's mechanism); a call that has waited max_wait_s goes to
the front after the preempted ones, in arrival order (program FCFS would otherwise hold a new program's first call behind
every older program's turns).

Options (policy_args): ttl_s (fixed TTL; default: chosen), default_ttl_s (2.0, until 8 durations are
seen), min_samples (100), prefill_s_per_token (5e-5), mem_price (10), tail_guard_s (1.0), max_wait_s (20),
pin_cap (0.5 of the pool), pin_cap_per_program (0.25 of the pool).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from quanta.config import SchedulerConfig
from quanta.kv.manager import KVCacheManager
from quanta.request import Request, RequestStatus
from quanta.sched.policy import Policy, register
from quanta.sched.queue import SortedQueue, WaitingQueue

_HISTORY = 2000  # durations kept per tool (the latest)
_ALL = object()  # the key of every tool's durations together


@register
class ContinuumPolicy(Policy):
    name = "continuum"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        args = config.policy_args
        ttl = args.get("ttl_s")
        self.fixed_ttl: float | None = None if ttl is None else float(ttl)
        self.default_ttl = float(args.get("default_ttl_s", 2.0))
        self.min_samples = int(args.get("min_samples", 100))
        self.prefill_s_per_token = float(args.get("prefill_s_per_token", 5e-5))
        self.mem_price = float(args.get("mem_price", 10.0))
        self.tail_guard = float(args.get("tail_guard_s", 1.0))
        self.max_wait = float(args.get("max_wait_s", 20.0))
        self.pin_cap = float(args.get("pin_cap", 0.5))
        self.pin_cap_per_program = float(args.get("pin_cap_per_program", 0.25))
        for name, v in (
            ("ttl_s", self.fixed_ttl or 0.0),
            ("tail_guard_s", self.tail_guard),
            ("max_wait_s", self.max_wait),
        ):
            if v < 0:
                raise ValueError(f"{name} must be >= 0")
        if not (0 <= self.pin_cap <= 1 and 0 <= self.pin_cap_per_program <= 1):
            raise ValueError("pin_cap and pin_cap_per_program are fractions of the pool, in [0, 1]")
        self.first_arrival: dict[str, float] = {}  # program -> its first call's arrival
        self._last_end: dict[str, tuple[float, str | None]] = {}  # program -> (last call's end, its tool)
        self.durations: dict[object, list[float]] = {}  # tool (or _ALL) -> observed tool times, sorted
        self._order: dict[object, deque[float]] = {}  # the same, oldest first
        self._mean_wait = 0.0
        self._num_waits = 0
        self._kv: KVCacheManager | None = None

    def attach(self, kv: KVCacheManager) -> None:
        self._kv = kv
        kv.max_pinned_blocks = int(self.pin_cap * kv.num_blocks)
        kv.max_blocks_per_pin = int(self.pin_cap_per_program * kv.num_blocks)

    def new_queue(self) -> SortedQueue:
        return SortedQueue(self.program_rank)

    def program_rank(self, req: Request) -> float:
        program = req.program
        return req.arrival_time if program is None else self.first_arrival.get(program, req.arrival_time)

    # ---- accounting -------------------------------------------------------------------------------
    def on_arrival(self, req: Request) -> None:
        program = req.program
        if program is None:
            return
        self.first_arrival.setdefault(program, req.arrival_time)
        last = self._last_end.pop(program, None)
        if last is not None:  # the tool ran from the last call's end to this arrival
            self._observe(last[1], max(req.arrival_time - last[0], 0.0))

    def _observe(self, tool: str | None, d: float) -> None:
        for key in (tool, _ALL):
            hist = self.durations.setdefault(key, [])
            order = self._order.setdefault(key, deque())
            bisect.insort(hist, d)
            order.append(d)
            if len(order) > _HISTORY:  # forget the oldest
                del hist[bisect.bisect_left(hist, order.popleft())]

    def on_admit(self, req: Request, now: float) -> None:
        if req.num_preemptions == 0:
            self._num_waits += 1
            self._mean_wait += (now - req.arrival_time - self._mean_wait) / self._num_waits

    def on_finish(self, req: Request) -> None:
        program = req.program
        if program is None:
            return
        if req.final_turn or req.status == RequestStatus.FINISHED_ABORTED:
            self.first_arrival.pop(program, None)
            self._last_end.pop(program, None)
        elif req.times.finished is not None:
            self._last_end[program] = (req.times.finished, req.tool_name)

    # ---- pins -------------------------------------------------------------------------------------
    def pin_ttl(self, req: Request, now: float) -> float | None:
        if self.fixed_ttl is not None:
            return self.fixed_ttl
        hist = self.durations.get(req.tool_name, [])
        if len(hist) < self.min_samples:
            hist = self.durations.get(_ALL, [])
        if len(hist) < 8:
            return self.default_ttl
        assert self._kv is not None
        benefit = req.num_tokens * self.prefill_s_per_token + self._mean_wait
        cost = self.mem_price * req.num_tokens / (self._kv.block_size * self._kv.num_blocks)
        best, best_score, n = 0.0, 0.0, len(hist)
        for i, d in enumerate(hist):
            score = (i + 1) / n * benefit - d * cost
            if score > best_score:
                best, best_score = d, score
        return best

    def may_drop_pins(self, req: Request, now: float) -> bool:
        return req.status == RequestStatus.PREEMPTED or now - req.arrival_time >= self.tail_guard

    # ---- order --------------------------------------------------------------------------------------
    def waiting_order(self, waiting: WaitingQueue, now: float) -> Iterator[Request]:
        kv = self._kv
        preempted: list[Request] = []
        pinned: list[Request] = []
        rest: list[Request] = []
        overdue: list[Request] = []
        late = now - self.max_wait
        for req in waiting:  # in program-FCFS order already (the queue's rank)
            if req.status == RequestStatus.PREEMPTED:
                preempted.append(req)
            elif req.arrival_time <= late:
                overdue.append(req)
            elif kv is not None and kv.pins and req.program in kv.pins:
                pinned.append(req)
            else:
                rest.append(req)
        yield from preempted
        if overdue:
            yield from sorted(overdue, key=lambda r: r.arrival_time)  # plain FCFS: the wait is bounded
        yield from pinned
        yield from rest
