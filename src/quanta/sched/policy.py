"""The Policy interface: the decisions a scheduling policy makes. The Scheduler owns the mechanism."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.queue import FCFSQueue

if TYPE_CHECKING:
    from quanta.sched.plan import StepPlan


class Policy:
    """Default behaviour: FCFS order, preempt the most recently admitted, chunk prompts to the budget.

    Multi-tenant policies override the ordering hooks (`waiting_order`, `running_order`), say which
    running requests a waiting one may evict (`may_preempt`), and keep their own accounting through the
    event hooks (`on_arrival`, `on_admit`, `on_step`, `on_finish`).
    """

    name: ClassVar[str] = "fcfs"
    # Orca/vLLM-2023 behaviour: a step that carries prefill runs no decodes.
    decodes_wait_for_prefill: ClassVar[bool] = False

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def new_queue(self) -> FCFSQueue:
        """The waiting queue; its iteration order is the admission order."""
        return FCFSQueue()

    def waiting_order(self, waiting: FCFSQueue, now: float) -> Iterator[Request]:
        """Waiting requests in admission order. A generator may look at accounting that `on_admit`
        updates between the requests it yields (VTC picks the least-served tenant each time)."""
        return iter(waiting)

    def running_order(self, running: list[Request], now: float) -> Iterable[Request]:
        """Order in which running requests get the step's budget (decodes first still holds)."""
        return running

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        """Which running request (in admission order, none yet scheduled this step) gives up its KV."""
        return candidates[-1]

    def may_preempt(self, waiting: Request, running: Request, now: float) -> bool:
        """Whether `waiting`, at the head of the queue and short of KV or a sequence slot, may evict
        `running`. Default: never (admission waits for memory to free up)."""
        return False

    def preemption_mode(self, victim: Request) -> str | None:
        """Swap or recompute ("swap" / "recompute") for this victim; None: SchedulerConfig.preemption_mode."""
        return None

    def on_arrival(self, req: Request) -> None:
        """A request entered the engine."""

    def on_admit(self, req: Request, now: float) -> None:
        """A waiting request (new or preempted) was admitted to run."""

    def on_step(self, plan: StepPlan, duration: float) -> None:
        """A step ran (its tokens are counted in the requests already)."""

    def on_finish(self, req: Request) -> None:
        """A request left the engine (finished or aborted)."""

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
