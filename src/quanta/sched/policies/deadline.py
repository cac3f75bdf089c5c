"""Least slack first, for requests with a deadline or an SLO class (HEXGEN-TEXT2SQL's local queue).

slack = deadline - now - estimated remaining time. A request's deadline is its own (absolute clock
time), or arrival + TTFT + TPOT * (max_tokens - 1) from its SLO class. The remaining-time estimate
counts the steps the request still needs (prompt chunks, then one per output token) times the step
time, learnt from the durations of the steps run so far: in the simulator those are the cost model's
predictions, on the engine measured times. A request whose slack turns negative can no longer make its
deadline: it is demoted behind every request that still can (and may be preempted for them) rather
than allowed to make others miss theirs. Requests without a deadline are best effort, after the rest.
Options (policy_args): slo_classes ({name: {"ttft": s, "tpot": s}}), step_s (initial step time 0.05),
expected_output_tokens (256, when max_tokens is unset).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.plan import StepPlan
from quanta.sched.policy import Policy, register
from quanta.sched.queue import FCFSQueue

DEFAULT_SLO_CLASSES = {"interactive": {"ttft": 1.0, "tpot": 0.1}, "batch": {"ttft": 60.0, "tpot": 1.0}}


@register
class DeadlinePolicy(Policy):
    name = "deadline"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        args = config.policy_args
        self.slo_classes = {
            str(k): dict(v) for k, v in dict(args.get("slo_classes", DEFAULT_SLO_CLASSES)).items()
        }
        self.step_s = float(args.get("step_s", 0.05))
        self.expected_output = int(args.get("expected_output_tokens", 256))
        if self.step_s <= 0:
            raise ValueError(f"step_s must be positive, got {self.step_s}")
        self.demoted: set[str] = set()
        self._now = 0.0

    def deadline(self, req: Request) -> float | None:
        if req.deadline is not None:
            return req.deadline
        if req.slo_class is None:
            return None
        slo = self.slo_classes.get(req.slo_class)
        if slo is None:
            raise ValueError(f"unknown SLO class {req.slo_class!r}; known: {', '.join(self.slo_classes)}")
        out = req.sampling_params.max_tokens or self.expected_output
        return req.arrival_time + float(slo["ttft"]) + float(slo["tpot"]) * max(out - 1, 0)

    def remaining(self, req: Request) -> float:
        prompt_left = max(req.num_prompt_tokens - req.num_computed_tokens, 0)
        out_left = (req.sampling_params.max_tokens or self.expected_output) - req.num_output_tokens
        steps = math.ceil(prompt_left / self.config.max_num_batched_tokens) + max(out_left - 1, 0)
        return steps * self.step_s

    def slack(self, req: Request, now: float) -> float:
        deadline = self.deadline(req)
        return math.inf if deadline is None else deadline - now - self.remaining(req)

    def key(self, req: Request, now: float) -> tuple[bool, float]:
        slack = self.slack(req, now)
        if slack < 0:
            self.demoted.add(req.request_id)  # sticky: it stays behind the requests that can still make it
        return (req.request_id in self.demoted, slack)

    def waiting_order(self, waiting: FCFSQueue, now: float) -> Iterator[Request]:
        self._now = now
        return iter(sorted(waiting, key=lambda r: self.key(r, now)))

    def running_order(self, running: list[Request], now: float) -> Iterable[Request]:
        self._now = now
        return sorted(running, key=lambda r: self.key(r, now))

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        return max(reversed(candidates), key=lambda r: self.key(r, self._now))

    def may_preempt(self, waiting: Request, running: Request, now: float) -> bool:
        w_demoted, w_slack = self.key(waiting, now)
        r_demoted, r_slack = self.key(running, now)
        if w_demoted or w_slack == math.inf:
            return False
        # Only a request that can wait for the newcomer to finish and still make its own deadline.
        return r_demoted or r_slack > w_slack + self.remaining(waiting)

    def on_step(self, plan: StepPlan, duration: float) -> None:
        if plan.scheduled and duration > 0:
            self.step_s += 0.1 * (duration - self.step_s)

    def on_arrival(self, req: Request) -> None:
        self.deadline(req)  # an unknown SLO class is the caller's error, raised before the request is queued

    def on_finish(self, req: Request) -> None:
        self.demoted.discard(req.request_id)
