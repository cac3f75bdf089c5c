"""NullExecutor: runs no model. Every sampled token is a fixed id and every step takes a fixed time.

For exercising and timing the scheduler alone (unit tests, `benchmarks/scheduler_overhead.py`).
"""

from __future__ import annotations

from quanta.executor.base import StepResult
from quanta.sched.plan import StepPlan


class NullExecutor:
    def __init__(self, num_blocks: int, token_id: int = 0, step_time: float = 0.01) -> None:
        self._num_blocks = num_blocks
        self.token_id = token_id
        self.step_time = step_time
        self.plans: list[StepPlan] = []  # kept when record=True
        self.record = False

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    def execute(self, plan: StepPlan) -> StepResult:
        if self.record:
            self.plans.append(plan)
        sampled = {s.request.request_id: self.token_id for s in plan.scheduled if s.sample}
        return StepResult(sampled, self.step_time if plan.scheduled else 0.0)
