"""The Scheduler: token budget, KV allocation, preemption and resumption. Decisions come from a Policy."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

from quanta.config import SchedulerConfig
from quanta.kv.manager import KVCacheManager, cdiv
from quanta.request import Request, RequestStatus
from quanta.sched.plan import ScheduledRequest, StepPlan, TokenBudget
from quanta.sched.policy import Policy


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, policy: Policy) -> None:
        self.config = config
        self.kv = kv
        self.policy = policy
        self.waiting = policy.new_queue()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self._step_id = 0
        self._step_start = 0.0
        self._ran_short = False  # a running request could not get KV this step
        self.swapping_in: set[str] = set()  # admitted, but their KV has not landed on the device yet
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self.num_swap_ins = 0

    # ---- requests in and out -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        max_len = self.config.max_model_len
        if req.num_prompt_tokens >= max_len:
            raise ValueError(
                f"prompt has {req.num_prompt_tokens} tokens, longer than the context: "
                f"the model accepts at most {max_len - 1} prompt tokens"
            )
        self.policy.on_arrival(req)  # first: it may reject the request (an unknown SLO class)
        req.max_model_len = max_len
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.add(req)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is not None and not req.finished:
                self.finish_request(req, RequestStatus.FINISHED_ABORTED, now=None)

    def finish_request(
        self, req: Request, status: RequestStatus, now: float | None, kv_valid: bool = True
    ) -> None:
        assert status.finished
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        if now is not None:
            req.times.finished = now
        if kv_valid:
            self.kv.free(req)
        else:
            self.kv.discard(req)
        self.swapping_in.discard(req.request_id)
        self.waiting.forget(req)
        self.policy.on_finish(req)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan(step_id=self._step_id, finished_ids=self._finished_ids)
        self._step_id += 1
        self._finished_ids = []
        self._step_start = now
        self._ran_short = False
        budget = TokenBudget(self.config.max_num_batched_tokens)
        scheduled: set[str] = set()
        if self.policy.decodes_wait_for_prefill:
            self._schedule_waiting(plan, budget, scheduled, now)
            if not plan.scheduled:
                self._schedule_running(plan, budget, scheduled, now)
        else:
            self._preempt_for_waiting(plan, budget, now)
            self._schedule_running(plan, budget, scheduled, now)
            if not self._ran_short:  # admitting right after running out of KV would only thrash
                self._schedule_waiting(plan, budget, scheduled, now)
        plan.num_batched_tokens = self.config.max_num_batched_tokens - budget.left
        return plan

    def _add(self, plan: StepPlan, budget: TokenBudget, scheduled: set[str], req: Request, n: int) -> None:
        computed = req.num_computed_tokens
        plan.scheduled.append(
            ScheduledRequest(
                req, n, computed, self.kv.req_blocks[req.request_id], computed + n == req.num_tokens
            )
        )
        scheduled.add(req.request_id)
        budget.take(n)

    def _schedule_running(self, plan: StepPlan, budget: TokenBudget, scheduled: set[str], now: float) -> None:
        """Running requests in the policy's order: every decode first, then partly-computed prompts."""
        decodes: list[Request] = []
        partial: list[Request] = []
        for req in self.policy.running_order(self.running, now):
            if req.request_id in self.swapping_in:
                continue  # skipped, not waited for: its KV is still on the way
            (decodes if req.num_tokens - req.num_computed_tokens == 1 else partial).append(req)
        for req in decodes:
            if budget.left == 0:
                return
            if req.status == RequestStatus.RUNNING and self._allocate_or_preempt(plan, req, 1, scheduled):
                self._add(plan, budget, scheduled, req, 1)
        for req in partial:
            if budget.left == 0:
                return
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            missing = req.num_tokens - req.num_computed_tokens
            n = min(self.policy.prefill_tokens(req, missing, budget.left), budget.left)
            if n > 0 and self._allocate_or_preempt(plan, req, n, scheduled):
                self._add(plan, budget, scheduled, req, n)

    def _allocate_or_preempt(self, plan: StepPlan, req: Request, n: int, scheduled: set[str]) -> bool:
        """Allocate KV for a running request, preempting others while the pool is short."""
        while not self.kv.allocate_slots(req, n):
            self._ran_short = True
            candidates = [
                r
                for r in self.running
                if r is not req and r.request_id not in scheduled and r.request_id not in self.swapping_in
            ]
            victim = self.policy.preemption_victim(candidates) if candidates else req
            self._preempt(plan, victim)
            if victim is req:
                return False
        return True

    def _preempt_for_waiting(self, plan: StepPlan, budget: TokenBudget, now: float) -> None:
        """Evict running requests the policy ranks below the head of the waiting queue, while the head
        lacks KV blocks or a sequence slot (strict priority, deadlines). Policies that never preempt skip."""
        if not self.waiting or type(self.policy).may_preempt is Policy.may_preempt:
            return
        bs = self.kv.block_size
        slots = self.config.max_num_seqs - len(self.running)
        # Running decodes come first in the step: keep their tokens and their next blocks aside.
        tokens_left = budget.left
        reserve = 0
        for r in self.running:
            if r.num_tokens - r.num_computed_tokens == 1:
                tokens_left -= 1
            held = self.kv.req_blocks.get(r.request_id)
            reserve += held is not None and len(held) * bs < r.num_tokens
        need = reserve
        # A snapshot: preempting adds to the waiting queue.
        for w in list(itertools.islice(self.policy.waiting_order(self.waiting, now), 64)):
            if self.kv.is_swapped(w.request_id):
                tokens, blocks = 0, self.kv.swap_in_blocks_needed(w)
            else:
                tokens = min(w.num_tokens - w.num_computed_tokens, tokens_left)
                if tokens <= 0:
                    return
                blocks = cdiv(tokens, bs)
            need += blocks
            while self.kv.num_free_blocks < need or slots < 1:
                candidates = [
                    r
                    for r in self.running
                    if r.request_id not in self.swapping_in and self.policy.may_preempt(w, r, now)
                ]
                if not candidates:
                    return  # the head waits, and nothing behind it jumps ahead
                self._preempt(plan, self.policy.preemption_victim(candidates))
                slots += 1
            slots -= 1
            tokens_left -= tokens

    def _preempt(self, plan: StepPlan, req: Request) -> None:
        """Give up the request's KV and requeue it at its old place. Swap: its computed KV is copied to
        host memory and comes back on resumption. Recompute (or no host room): the KV is dropped and the
        request resumes by recomputing its tokens so far."""
        self.running.remove(req)
        mode = self.policy.preemption_mode(req) or self.config.preemption_mode
        runs = self.kv.swap_out(req) if mode == "swap" else None
        if runs is None:
            self.kv.free(req)
            req.num_computed_tokens = 0
        else:
            plan.swap_out.extend(runs)
            self.num_swap_outs += 1
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(req)
        plan.preempted_ids.append(req.request_id)

    def _schedule_waiting(self, plan: StepPlan, budget: TokenBudget, scheduled: set[str], now: float) -> None:
        admitted: list[Request] = []
        for req in self.policy.waiting_order(self.waiting, now):
            if budget.left == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if not self.policy.admit(req, now):
                continue
            if self.kv.is_swapped(req.request_id):
                # Headroom of a block per running request: swapping back into a full pool would only
                # swap someone out again at the next block boundary (thrashing).
                if self.kv.swap_in_blocks_needed(req) + len(self.running) > self.kv.num_free_blocks:
                    break
                runs = self.kv.swap_in(req)
                if runs is None:
                    break
                # Runs from the next step on, once the executor reports its KV back on the device.
                plan.swap_in.extend(runs)
                plan.swap_in_ids.append(req.request_id)
                self.swapping_in.add(req.request_id)
                self.num_swap_ins += 1
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                admitted.append(req)
                self.policy.on_admit(req, now)
                continue
            hits = self.kv.get_computed_blocks(req)
            num_cached = len(hits) * self.kv.block_size
            n = self.policy.prefill_tokens(req, req.num_tokens - num_cached, budget.left)
            n = min(n, budget.left)
            if n <= 0 or not self.kv.allocate_slots(req, n, hits):
                break  # keep the policy's order: nothing jumps the head of the queue
            req.num_computed_tokens = num_cached
            if req.times.first_scheduled is None:
                req.times.first_scheduled = now
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            admitted.append(req)
            self.policy.on_admit(req, now)
            self._add(plan, budget, scheduled, req, n)
        for req in admitted:
            self.waiting.remove(req)

    def fail_step(self, plan: StepPlan, now: float) -> list[Request]:
        """The executor could not run `plan`: abort its requests and keep their unwritten KV out of the
        prefix index, so that the engine goes on serving everything else. Returns the aborted requests."""
        failed = [s.request for s in plan.scheduled if not s.request.finished]
        # Swaps of the plan may not have happened either: those requests' KV cannot be trusted.
        swapped_out = [r for r in plan.preempted_ids if self.kv.is_swapped(r)]
        for request_id in [*plan.swap_in_ids, *swapped_out]:
            req = self.requests.get(request_id)
            if req is not None and req not in failed:
                failed.append(req)
        for req in failed:
            self.finish_request(req, RequestStatus.FINISHED_ABORTED, now, kv_valid=False)
        return failed

    def update(self, plan: StepPlan, sampled: Mapping[str, int], now: float) -> list[Request]:
        """Apply a step's results: advance computed tokens, append sampled tokens, finish stopped requests.

        Returns the requests that received a new token this step.
        """
        updated: list[Request] = []
        stopped: list[tuple[Request, RequestStatus]] = []
        for s in plan.scheduled:
            req = s.request
            if req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += s.num_new_tokens
            if s.sample:
                req.append_output_token(sampled[req.request_id], now)
                updated.append(req)
                status = req.check_stop()
                if status is not None:
                    stopped.append((req, status))
        for req, status in stopped:
            self.finish_request(req, status, now)
        self.policy.on_step(plan, now - self._step_start)
        return updated

    def swaps_done(self, request_ids: Iterable[str]) -> None:
        """The executor reports swap-ins that have landed: those requests are scheduled again."""
        for request_id in request_ids:
            self.swapping_in.discard(request_id)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        for req in self.running:
            assert req.status == RequestStatus.RUNNING
            assert req.num_computed_tokens <= req.num_tokens
            blocks = self.kv.req_blocks.get(req.request_id, [])
            assert len(blocks) * self.kv.block_size >= req.num_computed_tokens
        for req in self.waiting:
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert req.request_id not in self.kv.req_blocks, f"waiting {req.request_id} holds KV"
            if self.kv.is_swapped(req.request_id):
                assert req.status == RequestStatus.PREEMPTED and req.num_computed_tokens > 0
        assert self.swapping_in <= {r.request_id for r in self.running}
        assert all(r in self.requests for r in self.kv.host_blocks), "host KV of a departed request"
        assert len(self.running) + len(self.waiting) == len(self.requests)
        assert len(self.running) <= self.config.max_num_seqs
