from quanta.sched.plan import ScheduledRequest, StepPlan, TokenBudget
from quanta.sched.policy import POLICIES, Policy, make_policy, register
from quanta.sched.scheduler import Scheduler

__all__ = [
    "POLICIES",
    "Policy",
    "ScheduledRequest",
    "Scheduler",
    "StepPlan",
    "TokenBudget",
    "make_policy",
    "register",
]
