"""User-weighted fair queuing over tenants: virtual finish times, smallest first.

A virtual clock V advances by the service each step delivers divided by the total weight of the
backlogged tenants. Request j of tenant u gets F_j = max(V(arrival), F_last(u)) + cost_j / w_u, with
cost = prompt tokens + w_q * expected output tokens (from the output-length predictor, see
sched/predictor.py: the true length is unknown until the request ends). When a request ends, the
difference between its charged and its real cost is settled on the tenant's last finish time, so a
misestimate is neither a debt nor a credit for the tenant's later requests. Chaining F per tenant is
what makes a tenant that sends many requests get no more than its weighted share; long prompts do not
block others because chunked prefill splits them.
Options (policy_args): tenant_weights, output_weight (2), output_predictor, expected_output_tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from quanta.config import SchedulerConfig
from quanta.request import Request, RequestStatus
from quanta.sched.plan import StepPlan
from quanta.sched.policies.vtc import tenant_weights
from quanta.sched.policy import Policy, register
from quanta.sched.predictor import make_predictor
from quanta.sched.queue import SortedQueue, WaitingQueue


@register
class WFQPolicy(Policy):
    name = "wfq"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.weights = tenant_weights(config)
        self.w_q = float(config.policy_args.get("output_weight", 2.0))
        self.predictor = make_predictor(config)
        self.vtime = 0.0
        self.last_finish: dict[str, float] = {}
        self.finish_tag: dict[str, float] = {}
        self._charged: dict[str, float] = {}  # request id -> cost charged at arrival
        self._overcharge: dict[str, float] = {}  # tenant -> virtual time charged beyond the real cost
        self.backlog: Counter[str] = Counter()

    def _weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def on_arrival(self, req: Request) -> None:
        t = req.tenant
        cost = req.num_prompt_tokens + self.w_q * self.predictor.predict(req)
        start = max(self.vtime, self.last_finish.get(t, 0.0))
        self.finish_tag[req.request_id] = self.last_finish[t] = start + cost / self._weight(t)
        self._charged[req.request_id] = cost
        self.backlog[t] += 1

    def on_finish(self, req: Request) -> None:
        t = req.tenant
        self.finish_tag.pop(req.request_id, None)
        charged = self._charged.pop(req.request_id)
        real = req.num_prompt_tokens + self.w_q * req.num_output_tokens
        if req.status == RequestStatus.FINISHED_ABORTED:
            real = min(real, charged)  # an abort owes nothing more than it was charged
        self._overcharge[t] = self._overcharge.get(t, 0.0) + (charged - real) / self._weight(t)
        self.backlog[t] -= 1
        if self.backlog[t] == 0:
            del self.backlog[t]
            # Settle once the tenant has nothing left in the engine, so its own requests keep their
            # order; never before V, so idling banks no credit.
            self.last_finish[t] = max(self.last_finish[t] - self._overcharge.pop(t), self.vtime)
        self.predictor.observe(req)

    def on_step(self, plan: StepPlan, duration: float) -> None:
        service = sum(s.num_new_tokens + (self.w_q - 1) * s.sample for s in plan.scheduled)
        active = sum(self._weight(t) for t in self.backlog)
        if active > 0:
            self.vtime += service / active

    def new_queue(self) -> SortedQueue:
        return SortedQueue(lambda r: self.finish_tag[r.request_id])

    def waiting_order(self, waiting: WaitingQueue, now: float) -> Iterator[Request]:
        return iter(waiting)  # the queue is kept in finish-tag order

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        return max(reversed(candidates), key=lambda r: self.finish_tag[r.request_id])
