"""Continuum (arXiv 2511.02230): agent programs keep their KV across tool calls, and run program by program.

When a call of a program ends with a tool call (not its final turn), its KV is pinned for a time-to-live
tau chosen from the tool durations seen so far (that tool's, once it has `min_samples`, else all tools'):
tau = argmax over tau in {0} U observed of P(duration <= tau) * benefit - tau * cost, where the benefit of
a hit is the re-prefill it saves (context tokens * prefill_s_per_token) plus the queueing it saves (the
mean wait so far), and the cost is the pinned share of the pool times mem_price. Fixed mode: ttl_s.
Waiting order: preempted calls first, then calls whose program holds a pin, then program-level FCFS by
the program's first arrival (a program's next turn does not queue behind newer programs).
Tail guards: a call that has waited tail_guard_s, or was preempted, may release pins to be admitted
(the latest program's first; its own program's last, where it holds blocks the call will not reuse),
so no call waits unboundedly behind pins; pins also give way before any
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

import numpy as np

from quanta.config import SchedulerConfig
from quanta.kv.manager import KVCacheManager
from quanta.request import Request, RequestStatus
from quanta.sched.bounded import RecentDict
from quanta.sched.policy import Policy, register
from quanta.sched.queue import SortedQueue, WaitingQueue

_HISTORY = 512  # durations kept per tool (the latest)
_MAX_TOOLS = 256  # tools with durations of their own
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
        # Bounded (RecentDict): a client's session ids must not grow them without end.
        self.first_arrival: dict[str, float] = RecentDict()  # program -> its first call's arrival
        self._last_end: dict[str, tuple[float, str | None]] = RecentDict()  # program -> (last end, its tool)
        self.durations: dict[object, list[float]] = {}  # tool (or _ALL) -> observed tool times, sorted
        self._order: dict[object, deque[float]] = {}  # the same, oldest first
        self._arrays: dict[object, tuple[np.ndarray, np.ndarray]] = {}  # as arrays, while unchanged
        self._mean_wait = 0.0
        self._num_waits = 0
        self._kv: KVCacheManager | None = None
        self._preempted: dict[str, Request] = {}  # preempted calls, waiting again
        self._arrivals: deque[Request] = deque()  # new calls in arrival order (the head: still waiting)
        self._waiting_calls: dict[str, list[Request]] = {}  # program -> its calls not yet admitted

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
        self._arrivals.append(req)
        program = req.program
        if program is None:
            return
        self._waiting_calls.setdefault(program, []).append(req)
        self.first_arrival.setdefault(program, req.arrival_time)
        last = self._last_end.pop(program, None)
        if last is not None:  # the tool ran from the last call's end to this arrival
            self._observe(last[1], max(req.arrival_time - last[0], 0.0))

    def _observe(self, tool: str | None, d: float) -> None:
        # Past _MAX_TOOLS names (clients name tools at will), a new tool counts among all tools only.
        known = tool in self.durations or len(self.durations) <= _MAX_TOOLS
        for key in (tool, _ALL) if known else (_ALL,):
            hist = self.durations.setdefault(key, [])
            order = self._order.setdefault(key, deque())
            bisect.insort(hist, d)
            order.append(d)
            if len(order) > _HISTORY:  # forget the oldest
                del hist[bisect.bisect_left(hist, order.popleft())]
            self._arrays.pop(key, None)

    def on_preempt(self, req: Request) -> None:
        self._preempted[req.request_id] = req

    def _left_queue(self, req: Request) -> None:
        self._preempted.pop(req.request_id, None)
        calls = self._waiting_calls.get(req.program) if req.program is not None else None
        if calls is not None and req in calls:
            calls.remove(req)
            if not calls:
                del self._waiting_calls[req.program]  # type: ignore[arg-type]

    def on_admit(self, req: Request, now: float) -> None:
        self._left_queue(req)
        if req.num_preemptions == 0:
            self._num_waits += 1
            self._mean_wait += (now - req.arrival_time - self._mean_wait) / self._num_waits

    def on_finish(self, req: Request) -> None:
        self._left_queue(req)
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
        durations, cdf = self._array(req.tool_name if hist is self.durations.get(req.tool_name) else _ALL)
        # tau = the i-th shortest duration: P(duration <= tau) = (i + 1) / n; tau = 0 scores 0.
        scores = cdf * benefit - durations * cost
        i = int(np.argmax(scores))
        return float(durations[i]) if scores[i] > 0 else 0.0

    def _array(self, key: object) -> tuple[np.ndarray, np.ndarray]:
        """The sorted durations of `key` and their empirical CDF, as arrays (rebuilt after a change)."""
        arrays = self._arrays.get(key)
        if arrays is None:
            durations = np.asarray(self.durations[key])
            n = len(durations)
            arrays = self._arrays[key] = (durations, np.arange(1, n + 1) / n)
        return arrays

    def may_drop_pins(self, req: Request, now: float) -> bool:
        return req.status == RequestStatus.PREEMPTED or now - req.arrival_time >= self.tail_guard

    # ---- order --------------------------------------------------------------------------------------
    def waiting_order(self, waiting: WaitingQueue, now: float) -> Iterator[Request]:
        """Lazily: the scheduler stops at the first call that does not fit, so a busy step pays for the
        few small groups (preempted, overdue, pinned) and the head of the program-FCFS queue only."""
        assert isinstance(waiting, SortedQueue)
        seen: set[str] = set()
        preempted = [r for r in self._preempted.values() if r.status == RequestStatus.PREEMPTED]
        late = now - self.max_wait
        overdue = []
        arrivals = self._arrivals
        while arrivals and arrivals[0].status != RequestStatus.WAITING:
            arrivals.popleft()  # admitted or gone
        for r in arrivals:  # in arrival order
            if r.arrival_time > late:
                break
            if r.status == RequestStatus.WAITING:
                overdue.append(r)  # plain FCFS: no call waits much past max_wait_s
        pinned = []
        if self._kv is not None and self._kv.pins:
            for program in self._kv.pins:
                pinned.extend(
                    r for r in self._waiting_calls.get(program, ()) if r.status == RequestStatus.WAITING
                )
            pinned.sort(key=waiting.key)
        for group in (sorted(preempted, key=waiting.key), overdue, pinned, waiting):
            for r in group:
                if r.request_id not in seen:
                    seen.add(r.request_id)
                    yield r
