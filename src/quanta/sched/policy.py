"""The Policy interface: the decisions a scheduling policy makes. The Scheduler owns the mechanism."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.queue import FCFSQueue, WaitingQueue

if TYPE_CHECKING:
    from quanta.kv.manager import KVCacheManager
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
    # Whether the scheduler may plan a run of identical pure-decode steps at once (Scheduler.decode_run):
    # true when, while every running request decodes and none arrives or finishes, the policy's decisions
    # and state stay the same from step to step; `on_schedule` is then called for the run's last step
    # only, `on_step` not at all. None: true unless the policy keeps per-step accounting (overrides
    # on_step or on_schedule), so a new policy is exact by default.
    steady_decode: ClassVar[bool | None] = None
    # Whether such a run may also carry the chunks of one running prompt (the last admitted) beside the
    # decodes: true when, moreover, `prefill_tokens` chunks a prompt by its missing tokens and the budget
    # left alone, the same way at every step. None: true for runs-allowing policies that keep the base
    # chunking and let decodes run beside prefill.
    steady_prefill: ClassVar[bool | None] = None

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def attach(self, kv: KVCacheManager) -> None:
        """The KV cache the scheduler allocates from, given once at start. Policies may read it (pool
        size, block hashes, which prefixes are cached) to decide; they never allocate or free."""

    @classmethod
    def allows_decode_runs(cls) -> bool:
        if cls.steady_decode is not None:
            return cls.steady_decode
        return cls.on_step is Policy.on_step and cls.on_schedule is Policy.on_schedule

    @classmethod
    def allows_prefill_runs(cls) -> bool:
        if not cls.allows_decode_runs():
            return False
        if cls.steady_prefill is not None:
            return cls.steady_prefill
        return not cls.decodes_wait_for_prefill and cls.prefill_tokens is Policy.prefill_tokens

    def new_queue(self) -> WaitingQueue:
        """The waiting queue, built to give `waiting_order` cheaply. Default: FCFS."""
        return FCFSQueue()

    def waiting_order(self, waiting: WaitingQueue, now: float) -> Iterator[Request]:
        """Waiting requests in admission order. A generator may look at accounting that `on_admit`
        updates between the requests it yields (VTC picks the least-served tenant each time)."""
        return iter(waiting)

    def prefill_order(self, partial: list[Request], now: float) -> Iterable[Request]:
        """Order in which running, partly-computed prompts get what the step's budget has left after the
        decodes (every running decode gets its token: the budget holds at least max_num_seqs tokens).
        `partial` is in admission order."""
        return partial

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        """Which of `candidates` (running requests, in admission order) gives up its KV. When a running
        request runs short of blocks it is among them, and choosing it means it yields to the others;
        candidates may already be scheduled in this step. Default: the most recently admitted."""
        return candidates[-1]

    def may_preempt(self, waiting: Request, running: Request, now: float) -> bool:
        """Whether `waiting`, at the head of the queue and short of KV, tokens or a sequence slot, may
        evict `running` (or make it skip a prompt chunk). Default: never (admission waits)."""
        return False

    def victim_for(self, waiting: Request, candidates: Sequence[Request], now: float) -> Request | None:
        """The request that gives way to `waiting`: the policy's victim among the candidates it may
        preempt, or None. Policies whose `may_preempt` follows their victim order can answer with one
        pass (if `waiting` may not preempt the preferred victim, it may preempt none)."""
        outranked = [r for r in candidates if self.may_preempt(waiting, r, now)]
        return self.preemption_victim(outranked) if outranked else None

    def preemption_mode(self, victim: Request) -> str | None:
        """Swap or recompute ("swap" / "recompute") for this victim; None: SchedulerConfig.preemption_mode."""
        return None

    def on_schedule(self, now: float) -> None:
        """A step is being planned at clock time `now` (policies whose ranks age read the time here)."""

    def on_arrival(self, req: Request) -> None:
        """A request entered the engine."""

    def on_admit(self, req: Request, now: float) -> None:
        """A waiting request (new or preempted) was admitted to run."""

    def on_preempt(self, req: Request) -> None:
        """A running request was preempted: it is waiting again."""

    def on_step(self, plan: StepPlan, duration: float) -> None:
        """A step ran (its tokens are counted in the requests already)."""

    def on_finish(self, req: Request) -> None:
        """A request left the engine (finished or aborted)."""

    def pin_ttl(self, req: Request, now: float) -> float | None:
        """Seconds to keep a program's finished call's KV pinned (its program runs a tool, and its next
        call extends this context); None or 0: no pin, the blocks go to the LRU list. Default: no pins."""
        return None

    def program_rank(self, req: Request) -> float:
        """Order of programs when pins must give way to memory pressure: the largest rank goes first."""
        return req.arrival_time

    def may_drop_pins(self, req: Request, now: float) -> bool:
        """Whether `req`, waiting and short of KV, may release other programs' pins to be admitted."""
        return True

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
    if not isinstance(config.policy_args, dict):
        raise ValueError(f"policy settings must be a JSON object of named settings, not {config.policy_args!r}")
    given = config.policy_args
    config.policy_args = reads = _ReadKeys(given)  # policies read their settings while they are built
    try:
        policy = cls(config)
    except (TypeError, AttributeError, KeyError) as e:  # a setting of the wrong shape
        raise ValueError(f"policy {name!r}: bad policy settings {given!r} ({e})") from None
    finally:
        config.policy_args = given
    unread = sorted(set(given) - reads.read)
    if unread:  # a typo ("aging" for "aging_s") would otherwise run the default without a word
        warnings.warn(f"policy {name!r} does not use the settings {unread}", stacklevel=2)
    return policy


class _ReadKeys(dict):
    """Policy settings that note which of them were read."""

    def __init__(self, data: dict) -> None:
        super().__init__(data)
        self.read: set = set()

    def get(self, key: object, default: object = None) -> object:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: object) -> object:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return super().__contains__(key)
