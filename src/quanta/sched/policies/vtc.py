"""Virtual Token Counter fair sharing between tenants (Sheng et al., OSDI 2024).

Each tenant has a counter of the service it received: w_p per prompt token (charged at admission) and
w_q per generated token, divided by the tenant's weight. Admission repeatedly takes the oldest request
of the backlogged tenant with the smallest counter. A tenant that becomes backlogged again is lifted
to the smallest counter among the backlogged ones, so idling banks no credit. For two backlogged
tenants the service difference stays within 2 * max(w_p * L_input, w_q * M).
Options (policy_args): input_weight (1), output_weight (2), tenant_weights ({tenant: weight}).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator, Sequence

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.plan import StepPlan
from quanta.sched.policy import Policy, register
from quanta.sched.queue import FCFSQueue


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
        self.backlog: Counter[str] = Counter()  # requests in the engine per tenant
        self._charged: set[str] = set()  # prompt already charged (a preempted request is not charged twice)

    def _weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def on_arrival(self, req: Request) -> None:
        t = req.tenant
        if self.backlog[t] == 0:
            others = [self.counters.get(u, 0.0) for u, n in self.backlog.items() if n > 0 and u != t]
            self.counters[t] = max(self.counters.get(t, 0.0), min(others, default=0.0))
        self.backlog[t] += 1

    def on_finish(self, req: Request) -> None:
        self.backlog[req.tenant] -= 1
        assert self.backlog[req.tenant] >= 0
        self._charged.discard(req.request_id)

    def waiting_order(self, waiting: FCFSQueue, now: float) -> Iterator[Request]:
        queues: dict[str, deque[Request]] = {}
        for req in waiting:
            queues.setdefault(req.tenant, deque()).append(req)
        while queues:
            # Counters move as `on_admit` charges the requests yielded so far.
            tenant = min(queues, key=lambda t: (self.counters.get(t, 0.0), t))
            yield queues[tenant].popleft()
            if not queues[tenant]:
                del queues[tenant]

    def on_admit(self, req: Request, now: float) -> None:
        if req.request_id not in self._charged:
            self._charged.add(req.request_id)
            t = req.tenant
            self.counters[t] = self.counters.get(t, 0.0) + self.w_p * req.num_prompt_tokens / self._weight(t)

    def on_step(self, plan: StepPlan, duration: float) -> None:
        for s in plan.scheduled:
            if s.sample:
                t = s.request.tenant
                self.counters[t] = self.counters.get(t, 0.0) + self.w_q / self._weight(t)

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        # The most-served tenant gives up memory first; its latest request.
        return max(reversed(candidates), key=lambda r: self.counters.get(r.tenant, 0.0))
