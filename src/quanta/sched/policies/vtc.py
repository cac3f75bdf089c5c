"""Virtual Token Counter fair sharing between tenants (Sheng et al., OSDI 2024).

Each tenant has a counter of the service it received: w_p per prompt token (charged at admission) and
w_q per generated token, divided by the tenant's weight. Admission repeatedly takes the oldest request
of the backlogged tenant with the smallest counter; backlogged means having requests in the waiting
queue (the paper's Q), not merely running ones. A tenant that joins the queue is lifted so that idling
banks no credit: to the smallest counter among the backlogged tenants, or, when none is backlogged, to
the counter of the tenant that left the queue last (the engine may have been idle meanwhile). For two
backlogged tenants the service difference stays within 2 * max(w_p * L_input, w_q * M).
Options (policy_args): input_weight (1), output_weight (2), tenant_weights ({tenant: weight}).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.plan import StepPlan
from quanta.sched.policy import Policy, register
from quanta.sched.queue import ClassQueue, WaitingQueue


def tenant_weights(config: SchedulerConfig) -> dict[str, float]:
    weights = {str(k): float(v) for k, v in dict(config.policy_args.get("tenant_weights", {})).items()}
    bad = [t for t, w in weights.items() if w <= 0]
    if bad:
        raise ValueError(f"tenant weights must be positive: {', '.join(bad)}")
    return weights


@register
class VTCPolicy(Policy):
    name = "vtc"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.w_p = float(config.policy_args.get("input_weight", 1.0))
        self.w_q = float(config.policy_args.get("output_weight", 2.0))
        self.weights = tenant_weights(config)
        self.counters: dict[str, float] = {}
        self.queued: Counter[str] = Counter()  # waiting requests per tenant: the backlog
        self._waiting: set[str] = set()  # ids of the requests counted in `queued`
        self.last_left: str | None = None  # the tenant that most recently left the queue
        self._charged: set[str] = set()  # prompt already charged (a preempted request is not charged twice)

    def _weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def _enqueue(self, req: Request) -> None:
        self._waiting.add(req.request_id)
        self.queued[req.tenant] += 1

    def _dequeue(self, req: Request) -> None:
        self._waiting.remove(req.request_id)
        t = req.tenant
        self.queued[t] -= 1
        if self.queued[t] == 0:
            del self.queued[t]
            self.last_left = t

    def on_arrival(self, req: Request) -> None:
        t = req.tenant
        if t not in self.queued:  # joins the queue: lift
            others = [self.counters.get(u, 0.0) for u in self.queued]
            if others:
                floor = min(others)
            elif self.last_left is not None:
                floor = self.counters.get(self.last_left, 0.0)
            else:
                floor = 0.0
            self.counters[t] = max(self.counters.get(t, 0.0), floor)
        self._enqueue(req)

    def on_preempt(self, req: Request) -> None:
        self._enqueue(req)  # back in the queue, but not lifted: it was being served, not idle

    def on_admit(self, req: Request, now: float) -> None:
        self._dequeue(req)
        if req.request_id not in self._charged:
            self._charged.add(req.request_id)
            t = req.tenant
            self.counters[t] = self.counters.get(t, 0.0) + self.w_p * req.num_prompt_tokens / self._weight(t)

    def on_finish(self, req: Request) -> None:
        if req.request_id in self._waiting:  # aborted while waiting
            self._dequeue(req)
        self._charged.discard(req.request_id)

    def new_queue(self) -> ClassQueue:
        return ClassQueue(lambda r: r.tenant)

    def waiting_order(self, waiting: WaitingQueue, now: float) -> Iterator[Request]:
        assert isinstance(waiting, ClassQueue)
        heads = {t: iter(q) for t, q in waiting.classes().items() if len(q)}
        nxt = {t: next(it) for t, it in heads.items()}
        while nxt:
            # Counters move as `on_admit` charges the requests yielded so far.
            tenant = min(nxt, key=lambda t: (self.counters.get(t, 0.0), t))  # type: ignore[arg-type]
            yield nxt[tenant]
            following = next(heads[tenant], None)
            if following is None:
                del nxt[tenant]
            else:
                nxt[tenant] = following

    def on_step(self, plan: StepPlan, duration: float) -> None:
        for s in plan.scheduled:
            if s.sample:
                t = s.request.tenant
                self.counters[t] = self.counters.get(t, 0.0) + self.w_q / self._weight(t)

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        # The most-served tenant gives up memory first; its latest request.
        return max(reversed(candidates), key=lambda r: self.counters.get(r.tenant, 0.0))
