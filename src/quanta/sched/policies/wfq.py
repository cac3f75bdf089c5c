"""User-weighted fair queuing over tenants: virtual finish times, smallest first.

A virtual clock V advances by the service each step delivers divided by the total weight of the
backlogged tenants. Request j of tenant u gets F_j = max(V(arrival), F_last(u)) + cost_j / w_u, with
cost = prompt tokens + w_q * expected output tokens (max_tokens when given). Chaining F per tenant is
what makes a tenant that sends many requests get no more than its weighted share; long prompts do not
block others because chunked prefill splits them.
Options (policy_args): tenant_weights, output_weight (2), expected_output_tokens (256).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.plan import StepPlan
from quanta.sched.policies.vtc import tenant_weights
from quanta.sched.policy import Policy, register
from quanta.sched.queue import FCFSQueue


@register
class WFQPolicy(Policy):
    name = "wfq"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.weights = tenant_weights(config)
        self.w_q = float(config.policy_args.get("output_weight", 2.0))
        self.expected_output = int(config.policy_args.get("expected_output_tokens", 256))
        self.vtime = 0.0
        self.last_finish: dict[str, float] = {}
        self.finish_tag: dict[str, float] = {}
        self.backlog: Counter[str] = Counter()

    def _weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def on_arrival(self, req: Request) -> None:
        t = req.tenant
        out = req.sampling_params.max_tokens or self.expected_output
        start = max(self.vtime, self.last_finish.get(t, 0.0))
        cost = req.num_prompt_tokens + self.w_q * out
        self.finish_tag[req.request_id] = self.last_finish[t] = start + cost / self._weight(t)
        self.backlog[t] += 1

    def on_finish(self, req: Request) -> None:
        self.backlog[req.tenant] -= 1
        self.finish_tag.pop(req.request_id, None)

    def on_step(self, plan: StepPlan, duration: float) -> None:
        service = sum(s.num_new_tokens + (self.w_q - 1) * s.sample for s in plan.scheduled)
        active = sum(self._weight(t) for t, n in self.backlog.items() if n > 0)
        if active > 0:
            self.vtime += service / active

    def waiting_order(self, waiting: FCFSQueue, now: float) -> Iterator[Request]:
        return iter(sorted(waiting, key=lambda r: self.finish_tag[r.request_id]))

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        return max(reversed(candidates), key=lambda r: self.finish_tag[r.request_id])
