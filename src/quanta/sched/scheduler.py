"""The Scheduler: token budget, KV allocation, preemption and resumption. Decisions come from a Policy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from quanta.config import SchedulerConfig
from quanta.kv.manager import KVCacheManager
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
        self.num_preemptions = 0

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
        self.waiting.forget(req)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan(step_id=self._step_id, finished_ids=self._finished_ids)
        self._step_id += 1
        self._finished_ids = []
        budget = TokenBudget(self.config.max_num_batched_tokens)
        scheduled: set[str] = set()
        if self.policy.decodes_wait_for_prefill:
            self._schedule_waiting(plan, budget, scheduled, now)
            if not plan.scheduled:
                self._schedule_running(plan, budget, scheduled)
        else:
            self._schedule_running(plan, budget, scheduled)
            if not plan.preempted_ids:  # admitting right after preempting would only thrash
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

    def _schedule_running(self, plan: StepPlan, budget: TokenBudget, scheduled: set[str]) -> None:
        """Running requests in admission order: every decode first, then partly-computed prompts."""
        decodes: list[Request] = []
        partial: list[Request] = []
        for req in self.running:
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
            candidates = [r for r in self.running if r is not req and r.request_id not in scheduled]
            victim = self.policy.preemption_victim(candidates) if candidates else req
            self._preempt(plan, victim)
            if victim is req:
                return False
        return True

    def _preempt(self, plan: StepPlan, req: Request) -> None:
        """Preemption by recompute: drop the KV, requeue; the request resumes from its tokens so far."""
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(req)
        plan.preempted_ids.append(req.request_id)

    def _schedule_waiting(self, plan: StepPlan, budget: TokenBudget, scheduled: set[str], now: float) -> None:
        admitted: list[Request] = []
        for req in self.waiting:
            if budget.left == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if not self.policy.admit(req, now):
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
            self._add(plan, budget, scheduled, req, n)
        for req in admitted:
            self.waiting.remove(req)

    def fail_step(self, plan: StepPlan, now: float) -> list[Request]:
        """The executor could not run `plan`: abort its requests and keep their unwritten KV out of the
        prefix index, so that the engine goes on serving everything else. Returns the aborted requests."""
        failed = [s.request for s in plan.scheduled if not s.request.finished]
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
        return updated

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
        assert len(self.running) + len(self.waiting) == len(self.requests)
        assert len(self.running) <= self.config.max_num_seqs
