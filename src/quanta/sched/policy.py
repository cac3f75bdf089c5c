"""The Policy interface: the decisions a scheduling policy makes. The Scheduler owns the mechanism."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.queue import FCFSQueue


class Policy:
    """Default behaviour: FCFS order, preempt the most recently admitted, chunk prompts to the budget."""

    name: ClassVar[str] = "fcfs"
    # Orca/vLLM-2023 behaviour: a step that carries prefill runs no decodes.
    decodes_wait_for_prefill: ClassVar[bool] = False

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def new_queue(self) -> FCFSQueue:
        """The waiting queue; its iteration order is the admission order."""
        return FCFSQueue()

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        """Which running request (in admission order, none yet scheduled this step) gives up its KV."""
        return candidates[-1]

    def prefill_tokens(self, req: Request, num_remaining: int, budget_left: int) -> int:
        """How many of the request's missing tokens to process this step; 0 skips it."""
        return min(num_remaining, budget_left)

    def admit(self, req: Request, now: float) -> bool:
        """Whether a waiting request may start now (admission control)."""
        return True


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, config: SchedulerConfig) -> Policy:
    # Importing the package registers the built-in policies.
    import quanta.sched.policies  # noqa: F401

    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(POLICIES))}") from None
    return cls(config)
