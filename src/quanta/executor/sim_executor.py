"""SimExecutor: predicts a step's duration with a cost model instead of running a model.

With a VirtualClock, EngineCore then runs quanta's real scheduler, policies and KV manager in simulated
time. Sampled tokens are a fixed id: simulated requests carry ignore_eos and finish at the output length
their workload entry gives (max_tokens).
"""

from __future__ import annotations

from typing import Protocol

from quanta.executor.base import StepResult
from quanta.sched.plan import StepPlan


class StepTimeModel(Protocol):
    def plan_time(self, plan: StepPlan) -> float: ...


class ConstantStepTime:
    """Every step takes the same time: for exercising and timing the scheduler alone."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def plan_time(self, plan: StepPlan) -> float:
        return self.seconds


class ReplayStepTime:
    """Step times read from a recording, in order (to replay a real run in simulated time)."""

    def __init__(self, durations: list[float]) -> None:
        self._durations = iter(durations)

    def plan_time(self, plan: StepPlan) -> float:
        return next(self._durations)


class SimExecutor:
    def __init__(
        self, cost_model: StepTimeModel, num_blocks: int, token_id: int = 0, record: bool = False
    ) -> None:
        self.cost_model = cost_model
        self._num_blocks = num_blocks
        self.token_id = token_id
        self.plans: list[StepPlan] | None = [] if record else None  # every plan executed, when recording

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    def execute(self, plan: StepPlan) -> StepResult:
        if self.plans is not None:
            self.plans.append(plan)
        sampled = {s.request.request_id: self.token_id for s in plan.scheduled if s.sample}
        return StepResult(sampled, self.cost_model.plan_time(plan) if plan.scheduled else 0.0)
