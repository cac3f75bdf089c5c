"""Least slack first, for requests with a deadline or an SLO class (HEXGEN-TEXT2SQL's local queue).

A request's targets are its own deadline (absolute clock time), or its SLO class's TTFT and TPOT:
token k (from 0) is due at arrival + TTFT + TPOT * k, so the whole answer of N tokens at arrival + TTFT +
TPOT * (N - 1). N is unknown until the request ends; the output-length predictor (sched/predictor.py)
gives an expected length E, and never the true one. Time left is counted in steps times the step time:
ceil(uncomputed tokens / budget) steps give the next token (counting what a recompute preemption must
redo), then one step per further token. The step time is the median of the last 64 steps that ran
something (the cost model's predictions in the simulator, measured times on the engine), so one slow
step does not swing every decision.

slack = the deadline of E tokens (max(E, outputs so far + 1)) minus now minus the time to produce them.
Negative: the request cannot make its deadline. It is demoted behind every request that still can (and
may be preempted for them) rather than allowed to make others miss theirs, and promoted back once its
slack recovers above `recover_steps` step times (the estimates moved). A waiting request preempts a
running one only when it is urgent (slack under `urgent_steps` step times: otherwise memory frees up in
time) and the running one can wait for it, redo what a recompute preemption throws away, and still
make its own deadline; otherwise preempting only trades one miss for another, at the price of the work
thrown away. (Measured: ordering by the next token's due time instead, which needs no length estimate,
preempted twice as often and met fewer deadlines.)
Order: requests that can still make it, least ordering slack first; then demoted ones, earliest
deadline first; then best effort (no deadline), first come first.
Options (policy_args): slo_classes ({name: {"ttft": s, "tpot": s}}), step_s (initial step time,
0.05), recover_steps (10), urgent_steps (10), output_predictor, expected_output_tokens.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.plan import StepPlan
from quanta.sched.policy import Policy, register
from quanta.sched.predictor import make_predictor
from quanta.sched.queue import WaitingQueue

DEFAULT_SLO_CLASSES = {"interactive": {"ttft": 1.0, "tpot": 0.1}, "batch": {"ttft": 60.0, "tpot": 1.0}}
FEASIBLE, DEMOTED, BEST_EFFORT = 0, 1, 2


def _slo_targets(name: str, slo: object) -> dict[str, float]:
    """One SLO class's targets, checked when the policy is built: a class without both targets, or with
    a negative or non-finite one, would otherwise fail only when a request of that class arrives."""
    try:
        targets = {key: float(slo[key]) for key in ("ttft", "tpot")}  # type: ignore[index]
    except (TypeError, ValueError, KeyError):
        raise ValueError(f"SLO class {name!r} needs numbers 'ttft' and 'tpot' (seconds), got {slo!r}") from None
    if not all(0 <= v < math.inf for v in targets.values()):  # (nan fails this too)
        raise ValueError(f"SLO class {name!r}: 'ttft' and 'tpot' must be finite and >= 0, got {slo!r}")
    return targets


@register
class DeadlinePolicy(Policy):
    name = "deadline"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        args = config.policy_args
        self.slo_classes = {
            str(k): _slo_targets(str(k), v) for k, v in dict(args.get("slo_classes", DEFAULT_SLO_CLASSES)).items()
        }
        step_s = float(args.get("step_s", 0.05))
        if step_s <= 0:
            raise ValueError(f"step_s must be positive, got {step_s}")
        self.recover_steps = float(args.get("recover_steps", 10))
        self.urgent_steps = float(args.get("urgent_steps", 10))
        self.predictor = make_predictor(config)
        self._steps: deque[float] = deque([step_s], maxlen=64)
        self.step_s = step_s
        # (due time of token 0, TPOT) per request with a deadline; an absolute deadline has TPOT 0.
        self.targets: dict[str, tuple[float, float] | None] = {}
        self.expected: dict[str, int] = {}  # expected output tokens, estimated at arrival
        self.demoted: set[str] = set()
        self._now = 0.0
        self._ranks: dict[str, tuple[int, float]] = {}  # this step's classification of running requests

    # ---- estimates -------------------------------------------------------------------------------
    def _targets(self, req: Request) -> tuple[float, float] | None:
        if req.deadline is not None:
            return (req.deadline, 0.0)
        if req.slo_class is None:
            return None
        slo = self.slo_classes.get(req.slo_class)
        if slo is None:
            raise ValueError(f"unknown SLO class {req.slo_class!r}; known: {', '.join(self.slo_classes)}")
        return (req.arrival_time + slo["ttft"], slo["tpot"])

    def deadline(self, req: Request) -> float | None:
        """When the whole answer is due, for the expected length (None: best effort)."""
        targets = self.targets[req.request_id]
        if targets is None:
            return None
        first, tpot = targets
        return first + tpot * (max(self.expected[req.request_id], req.num_output_tokens + 1) - 1)

    def steps_to_next(self, req: Request) -> int:
        return math.ceil((req.num_tokens - req.num_computed_tokens) / self.config.max_num_batched_tokens)

    def remaining_steps(self, req: Request) -> int:
        outputs_left = max(self.expected[req.request_id] - req.num_output_tokens, 1)
        return self.steps_to_next(req) + outputs_left - 1

    def slack(self, req: Request, now: float) -> float:
        """Time to spare before the deadline of the expected answer (inf: best effort)."""
        deadline = self.deadline(req)
        if deadline is None:
            return math.inf
        return deadline - now - self.remaining_steps(req) * self.step_s

    def _classify(self, request_id: str, slack: float) -> int:
        """Demote or promote back (with hysteresis); the request's class."""
        if slack == math.inf:
            return BEST_EFFORT
        if request_id in self.demoted:
            if slack <= self.recover_steps * self.step_s:
                return DEMOTED
            self.demoted.discard(request_id)
        elif slack < 0:
            self.demoted.add(request_id)
            return DEMOTED
        return FEASIBLE

    def _demote(self, reqs: Sequence[Request], slack: np.ndarray, was: np.ndarray) -> np.ndarray:
        """`_classify` over arrays (best effort: inf slack): which requests are demoted now, with
        `self.demoted` brought up to date."""
        demoted = ~np.isinf(slack) & ((slack < 0) | (was & (slack <= self.recover_steps * self.step_s)))
        for i in np.flatnonzero(demoted != was).tolist():
            (self.demoted.add if demoted[i] else self.demoted.discard)(reqs[i].request_id)
        return demoted

    def rank(self, req: Request) -> tuple[int, float]:
        """(class, key) of a running request this step, lower first: slack, deadline, or arrival."""
        rid = req.request_id
        rank = self._ranks.get(rid)
        if rank is None:
            if self.targets[rid] is None:
                rank = (BEST_EFFORT, req.arrival_time)
            else:
                slack = self.slack(req, self._now)
                c = self._classify(rid, slack)
                rank = (c, slack if c == FEASIBLE else self.deadline(req))  # type: ignore[assignment]
            self._ranks[rid] = rank
        return rank

    # ---- hooks -----------------------------------------------------------------------------------
    def on_arrival(self, req: Request) -> None:
        # First: an unknown SLO class is the caller's error, raised before the request is queued.
        self.targets[req.request_id] = self._targets(req)
        self.expected[req.request_id] = self.predictor.predict(req)

    def on_finish(self, req: Request) -> None:
        self.targets.pop(req.request_id, None)
        self.expected.pop(req.request_id, None)
        self.demoted.discard(req.request_id)
        self.predictor.observe(req)

    def on_schedule(self, now: float) -> None:
        self._now = now
        self._ranks.clear()

    def on_step(self, plan: StepPlan, duration: float) -> None:
        if plan.scheduled and duration > 0:
            self._steps.append(duration)
            self.step_s = statistics.median(self._steps)

    # ---- decisions -------------------------------------------------------------------------------
    def new_queue(self) -> SlackQueue:
        return SlackQueue(self)

    def waiting_order(self, waiting: WaitingQueue, now: float) -> Iterator[Request]:
        assert isinstance(waiting, SlackQueue)
        return waiting.ordered(now)

    def prefill_order(self, partial: list[Request], now: float) -> Iterable[Request]:
        return sorted(partial, key=self.rank)

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        # A best-effort request gives way first (the latest), then one that cannot make its deadline
        # (the latest deadline), then the one with the most slack. Ranked in arrays: this runs every
        # step that a request with a deadline waits behind a full batch.
        n = len(candidates)
        targets, expected = self.targets, self.expected
        first = np.fromiter((math.inf if (t := targets[r.request_id]) is None else t[0] for r in candidates), float, n)
        tpot = np.fromiter((0.0 if (t := targets[r.request_id]) is None else t[1] for r in candidates), float, n)
        outputs = np.fromiter((len(r.output_token_ids) for r in candidates), float, n)
        uncomputed = np.fromiter((len(r.all_token_ids) - r.num_computed_tokens for r in candidates), float, n)
        exp = np.fromiter((expected[r.request_id] for r in candidates), float, n)
        # As `slack` counts them.
        to_next = np.ceil(uncomputed / self.config.max_num_batched_tokens)
        step, now = self.step_s, self._now
        deadline = first + tpot * (np.maximum(exp, outputs + 1) - 1)
        slack = deadline - now - (to_next + np.maximum(exp - outputs, 1) - 1) * step
        best_effort = np.isinf(deadline)
        was = np.fromiter((r.request_id in self.demoted for r in candidates), bool, n)
        demoted = self._demote(candidates, slack, was)
        arrival = np.fromiter((r.arrival_time for r in candidates), float, n)
        give_way = np.where(best_effort, BEST_EFFORT, np.where(demoted, DEMOTED, FEASIBLE - 1))
        if self.config.preemption_mode == "recompute":
            # The slack it would have left after redoing what the preemption throws away.
            computed = np.fromiter((r.num_computed_tokens for r in candidates), float, n)
            slack = slack - np.ceil(computed / self.config.max_num_batched_tokens) * step
        key = np.where(best_effort, arrival, np.where(demoted, deadline, slack))
        # Largest (class, key); among equals the latest in the candidates' (admission) order.
        order = np.lexsort((np.arange(n), key, give_way))
        return candidates[int(order[-1])]

    def _urgent_slack(self, waiting: Request, now: float) -> float | None:
        """The slack of a waiting request that may preempt: one that can still make its deadline, but
        only if it runs soon (otherwise memory frees up in time); None for any other."""
        slack = self.slack(waiting, now)
        if self._classify(waiting.request_id, slack) != FEASIBLE or slack > self.urgent_steps * self.step_s:
            return None
        return slack

    def _gives_way(self, waiting: Request, w_slack: float, running: Request) -> bool:
        c, key = self.rank(running)
        if c != FEASIBLE:
            return True
        # Only a request that can wait for the newcomer, redo what a recompute preemption throws away,
        # and still make its own deadline (otherwise preempting only trades one miss for another).
        redo = 0
        if self.config.preemption_mode == "recompute":
            redo = math.ceil(running.num_computed_tokens / self.config.max_num_batched_tokens)
        return key - redo * self.step_s > w_slack + self.remaining_steps(waiting) * self.step_s

    def may_preempt(self, waiting: Request, running: Request, now: float) -> bool:
        w_slack = self._urgent_slack(waiting, now)
        return w_slack is not None and self._gives_way(waiting, w_slack, running)

    def victim_for(self, waiting: Request, candidates: Sequence[Request], now: float) -> Request | None:
        w_slack = self._urgent_slack(waiting, now)
        if w_slack is None:
            return None  # as may_preempt would say of every candidate, without ranking them
        victim = self.preemption_victim(candidates)  # if not the one most able to wait, none
        return victim if self._gives_way(waiting, w_slack, victim) else None


class SlackQueue:
    """The deadline policy's waiting queue: deadlines and step counts in arrays, so that each step
    classifies and orders every waiting request in a few vectorized operations instead of a Python sort
    (a waiting request's deadlines and step counts are fixed until it runs; only the step time and the
    clock move)."""

    _ARRAYS = ("_deadline", "_steps", "_arrival", "_seq", "_demoted")

    def __init__(self, policy: DeadlinePolicy) -> None:
        self.policy = policy
        self._reqs: list[Request] = []
        self._slot: dict[str, int] = {}
        self._deadline = np.empty(0)  # of the whole answer at the expected length; inf: best effort
        self._steps = np.empty(0)  # to produce it
        self._arrival = np.empty(0)
        self._seq = np.empty(0, dtype=np.int64)  # tie break, fixed at first entry (FCFS among equals)
        self._demoted = np.empty(0, dtype=bool)  # mirrors policy.demoted for the waiting requests
        self._seq_of: dict[str, int] = {}
        self._counter = itertools.count()

    def _grow(self) -> None:
        cap = max(64, 2 * len(self._deadline))
        for name in self._ARRAYS:
            old = getattr(self, name)
            new = np.empty(cap, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def add(self, req: Request) -> None:
        i = len(self._reqs)
        if i == len(self._deadline):
            self._grow()
        rid = req.request_id
        policy = self.policy
        deadline = policy.deadline(req)
        self._deadline[i] = math.inf if deadline is None else deadline
        self._steps[i] = policy.remaining_steps(req)
        self._arrival[i] = req.arrival_time
        seq = self._seq_of.get(rid)
        if seq is None:
            seq = self._seq_of[rid] = next(self._counter)
        self._seq[i] = seq
        self._demoted[i] = rid in policy.demoted
        self._slot[rid] = i
        self._reqs.append(req)

    def remove(self, req: Request) -> None:
        i = self._slot.pop(req.request_id)
        last = len(self._reqs) - 1
        if i != last:  # move the last entry into the hole
            moved = self._reqs[last]
            self._reqs[i] = moved
            self._slot[moved.request_id] = i
            for name in self._ARRAYS:
                arr = getattr(self, name)
                arr[i] = arr[last]
        self._reqs.pop()

    def forget(self, req: Request) -> None:
        self._seq_of.pop(req.request_id, None)

    def ordered(self, now: float) -> Iterator[Request]:
        """This step's classification of every waiting request (demotions recorded in the policy), and
        the requests in the policy's order."""
        n = len(self._reqs)
        if n == 0:
            return iter(())
        policy = self.policy
        step = policy.step_s
        deadline = self._deadline[:n]
        slack = deadline - now - self._steps[:n] * step
        was = self._demoted[:n]
        best_effort = np.isinf(deadline)
        demoted = policy._demote(self._reqs, slack, was)
        was[:] = demoted
        cls = np.where(best_effort, BEST_EFFORT, np.where(demoted, DEMOTED, FEASIBLE))
        key = np.where(cls == FEASIBLE, slack, np.where(cls == DEMOTED, deadline, self._arrival[:n]))
        order = np.lexsort((self._seq[:n], key, cls))
        reqs = self._reqs
        return (reqs[i] for i in order.tolist())

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._reqs))

    def __len__(self) -> int:
        return len(self._reqs)

    def __contains__(self, req: Request) -> bool:
        return req.request_id in self._slot
