"""The Scheduler: token budget, KV allocation, preemption and resumption. Decisions come from a Policy."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from quanta.config import SchedulerConfig
from quanta.kv.manager import KVCacheManager
from quanta.request import Request, RequestStatus
from quanta.sched.plan import ScheduledRequest, StepPlan, TokenBudget, first_sample_step
from quanta.sched.policy import Policy


@dataclass(slots=True)
class _Room:
    """What a step has left for admissions: free KV blocks (None: a running request will run short),
    batched tokens, sequence slots."""

    blocks: int | None
    tokens: int
    slots: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, policy: Policy) -> None:
        self.config = config
        self.kv = kv
        self.policy = policy
        policy.attach(kv)
        self.waiting = policy.new_queue()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self._step_id = 0
        self._step_start = 0.0
        self._ran_short = False  # a running request could not get KV this step
        self._in_plan: dict[str, ScheduledRequest] = {}  # this step's scheduled requests, by id
        self.swapping_in: set[str] = set()  # admitted, but their KV has not landed on the device yet
        # Requests stopped for the last stage of a live migration: they keep their KV here, are not
        # scheduled, and are no longer in `requests` until taken back (or released once committed
        # elsewhere). An entry whose request is finished was aborted meanwhile.
        self.migrating_out: dict[str, Request] = {}
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
        if self.kv.pins:
            self.kv.expire_pins(req.arrival_time)  # an idle engine plans no step that would have
            self.kv.claim_pin(req.program)  # it queues now: the pin waits for it rather than expire

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is not None and not req.finished:
                self.finish_request(req, RequestStatus.FINISHED_ABORTED, now=None)
            else:
                self.finish_migrating_out(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_migrating_out(self, request_id: str, status: RequestStatus) -> bool:
        """End a request stopped for the last stage of its migration out (aborted, or stopped by a stop
        string found after its last step here): the migration then neither commits nor resumes it."""
        req = self.migrating_out.get(request_id)
        if req is None or req.finished:
            return False
        self._end_migrated(req, status)
        return True

    # ---- live migration (the cluster's migration state machine drives these, between steps) ------
    def stop_for_migration(self, request_id: str) -> Request | None:
        """Take a running request out of the schedule, keeping its KV, for the last stage of its
        migration. None when it is not running (finished, aborted, preempted) or its swap-in is in flight."""
        req = self.requests.get(request_id)
        if req is None or req.status != RequestStatus.RUNNING or request_id in self.swapping_in:
            return None
        self.running.remove(req)
        del self.requests[request_id]
        self.migrating_out[request_id] = req
        return req

    def resume_migrated(self, request_id: str) -> bool:
        """The migration failed after the request stopped: it runs here again, where it left off.
        False when it was aborted meanwhile."""
        req = self.migrating_out.pop(request_id)
        if req.finished:
            return False
        self.requests[request_id] = req
        self.running.append(req)
        return True

    def release_migrated(self, request_id: str) -> bool:
        """The request committed on another instance: free its KV here. False when it was aborted
        meanwhile (the destination's copy must then be aborted too)."""
        req = self.migrating_out[request_id]
        if req.finished:
            del self.migrating_out[request_id]
            return False
        self._end_migrated(req, None)
        del self.migrating_out[request_id]
        return True

    def _end_migrated(self, req: Request, status: RequestStatus | None) -> None:
        """A stopped request leaves this engine: aborted (status), or migrated (None: its status stays
        the destination's business)."""
        if status is not None:
            req.status = status
        self.kv.free(req)
        self.kv.forget(req.request_id)
        self.policy.on_finish(req)
        self._finished_ids.append(req.request_id)  # the executor drops its per-request state

    def commit_migrated(self, req: Request, now: float) -> None:
        """A request migrated in: it owns the KV reserved for it and continues running here. The caller
        checks `has_free_slot` first."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        assert self.has_free_slot(), f"{req.request_id} migrated in without a sequence slot"
        self.policy.on_arrival(req)  # first: it may reject the request, and nothing has changed yet
        if req.request_id in self._finished_ids:
            # It left this engine since the last plan (it migrated away and back): the executor must not
            # drop the per-request state just set up for it.
            self._finished_ids.remove(req.request_id)
        self.kv.adopt_reserved(req, -(-req.num_computed_tokens // self.kv.block_size))
        req.max_model_len = self.config.max_model_len
        req.status = RequestStatus.RUNNING
        self.requests[req.request_id] = req
        self.running.append(req)
        self.policy.on_admit(req, now)

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
            self._pin_or_release(req, status, now)
            self.kv.free(req)
        else:
            self.kv.discard(req)
        self.swapping_in.discard(req.request_id)
        self.waiting.forget(req)
        self.policy.on_finish(req)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)

    def _pin_or_release(self, req: Request, status: RequestStatus, now: float | None) -> None:
        """A program's call ends: a final turn releases the program's pin; another turn that stopped
        normally may keep its KV pinned for the policy's time-to-live (while the program runs its tool)."""
        program = req.program
        if program is None:
            return
        if req.final_turn or status == RequestStatus.FINISHED_ABORTED:
            self.kv.unpin(program)
            return
        if now is None:
            return
        ttl = self.policy.pin_ttl(req, now)
        if ttl is not None and ttl > 0:
            self.kv.pin(req, now + ttl, self.policy.program_rank(req))

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_slots_taken(self) -> int:
        """Sequence slots in use (at most max_num_seqs): the running requests, and those stopped for the
        last stage of a migration out, whose slot stays theirs until it commits (a failed migration
        resumes them here)."""
        return len(self.running) + len(self.migrating_out)

    def has_free_slot(self) -> bool:
        return self.num_slots_taken < self.config.max_num_seqs

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan(step_id=self._step_id, finished_ids=self._finished_ids)
        self._step_id += 1
        self._finished_ids = []
        self._step_start = now
        self._ran_short = False
        self._in_plan = {}
        if self.kv.pins:
            self.kv.expire_pins(now)
        self.policy.on_schedule(now)
        budget = TokenBudget(self.config.max_num_batched_tokens)
        if self.policy.decodes_wait_for_prefill:
            self._schedule_waiting(plan, budget, now)
            if not plan.scheduled:
                self._schedule_running(plan, budget, self._running_split(now))
        else:
            split = self._running_split(now)
            deferred, made_room_for = self._preempt_for_waiting(plan, split, now)
            self._schedule_running(plan, budget, split, deferred)
            if not self._ran_short:  # admitting right after running out of KV would only thrash
                self._schedule_waiting(plan, budget, now)
            assert made_room_for is None or made_room_for.status == RequestStatus.RUNNING, (
                f"room was made for {made_room_for.request_id}, but it was not admitted"
            )
        plan.num_batched_tokens = self.config.max_num_batched_tokens - budget.left
        return plan

    def _add(self, plan: StepPlan, budget: TokenBudget, req: Request, n: int) -> None:
        computed = req.num_computed_tokens
        s = ScheduledRequest(
            req, n, computed, self.kv.req_blocks[req.request_id], computed + n == req.num_tokens
        )
        plan.scheduled.append(s)
        self._in_plan[req.request_id] = s
        budget.take(n)

    def _unschedule(self, plan: StepPlan, budget: TokenBudget, req: Request) -> None:
        """Take back a request scheduled earlier in this step (it is about to be preempted)."""
        s = self._in_plan.pop(req.request_id)
        plan.scheduled.remove(s)
        budget.give_back(s.num_new_tokens)

    def _running_split(self, now: float) -> tuple[list[Request], list[Request]]:
        """Running requests as the step will serve them: every decode first (Sarathi-Serve), then
        partly-computed prompts in the policy's order. Requests whose swap-in has not landed sit out."""
        decodes: list[Request] = []
        partial: list[Request] = []
        swapping_in = self.swapping_in
        for req in self.running:
            if swapping_in and req.request_id in swapping_in:
                continue  # skipped, not waited for: its KV is still on the way
            (decodes if req.num_tokens - req.num_computed_tokens == 1 else partial).append(req)
        if len(partial) > 1:
            partial = list(self.policy.prefill_order(partial, now))
        return decodes, partial

    def _schedule_running(
        self,
        plan: StepPlan,
        budget: TokenBudget,
        split: tuple[list[Request], list[Request]],
        deferred: frozenset[str] = frozenset(),
    ) -> None:
        decodes, partial = split
        for req in decodes:
            if budget.left == 0:
                return
            if req.status == RequestStatus.RUNNING and self._allocate_or_preempt(plan, budget, req, 1):
                self._add(plan, budget, req, 1)
        for req in partial:
            if budget.left == 0:
                return
            if req.status != RequestStatus.RUNNING or req.request_id in deferred:
                continue  # preempted earlier in this step, or yielding its chunk to a request ranked above
            n = self._chunk(req, budget.left)
            if n > 0 and self._allocate_or_preempt(plan, budget, req, n):
                self._add(plan, budget, req, n)

    def _allocate_or_preempt(self, plan: StepPlan, budget: TokenBudget, req: Request, n: int) -> bool:
        """Allocate KV for a running request, preempting while the pool is short. The policy picks each
        victim among every running request, the one asking included (as vLLM does): a request ranked
        below all others gives itself up rather than evict a better one, even one scheduled earlier in
        this step (it is taken back out of the plan)."""
        while not self.kv.allocate_slots(req, n):
            if self.kv.drop_pin():  # pins give way before any running request does
                continue
            self._ran_short = True
            victim = self.policy.preemption_victim(self._preemptible())
            if victim.request_id in self._in_plan:
                self._unschedule(plan, budget, victim)
            self._preempt(plan, victim)
            if victim is req:
                return False
        return True

    # ---- room for the head of the queue -------------------------------------------------------------
    def _preempt_for_waiting(
        self, plan: StepPlan, split: tuple[list[Request], list[Request]], now: float
    ) -> tuple[frozenset[str], Request | None]:
        """Make room for waiting requests that the policy ranks above running ones (strict priority,
        deadlines): look ahead at what the running requests will take this step (tokens and KV blocks,
        counted by the KV manager exactly as the allocation will), then, while the head of the queue
        would not fit, the policy's victim among the running requests it outranks gives way: a
        partly-computed prompt skips its chunk this step when tokens or blocks are short (deferred), any
        request is preempted when a sequence slot is short or nothing is left to defer.

        Returns the deferred requests and the first request room was made for (it must be admitted).
        Policies that never preempt skip this."""
        if not self.waiting or type(self.policy).may_preempt is Policy.may_preempt:
            return frozenset(), None
        # A snapshot of the order: preempting adds to the queue.
        order = itertools.islice(self.policy.waiting_order(self.waiting, now), 64)
        admissible = [w for w in order if self.policy.admit(w, now)]
        preemptible = self._preemptible()
        if not admissible or not preemptible or self.policy.victim_for(admissible[0], preemptible, now) is None:
            # The head outranks no running request: it is admitted if it fits, or waits, and nothing
            # behind it jumps ahead. Most steps of a busy engine end here, without the look-ahead.
            return frozenset(), None
        deferred: set[str] = set()
        helped: set[str] = set()  # requests that something gave way to
        while True:
            # From the top each time: a request that fitted may take more once others gave way (a longer
            # chunk with the tokens a deferred prompt handed back), so nobody's room is taken as given.
            look = self._look_ahead(split, deferred)
            fitted: list[Request] = []
            for w in admissible:
                shortage = self._admission_shortage(w, look)
                if shortage is not None:
                    break
                fitted.append(w)
            else:
                shortage = None
            made_room_for = next((w for w in fitted if w.request_id in helped), None)
            if shortage is None:
                return frozenset(deferred), made_room_for
            victim = self._victim_for(w, shortage, deferred, now)
            if victim is None:
                return frozenset(deferred), made_room_for  # w waits; nothing behind it jumps
            is_prompt = victim.num_tokens_to_compute > 1
            if shortage != "slot" and is_prompt and victim.request_id not in deferred:
                deferred.add(victim.request_id)  # a prompt chunk: skipping it for a step may be enough
            else:
                self._preempt(plan, victim)
            helped.add(w.request_id)

    def _look_ahead(self, split: tuple[list[Request], list[Request]], deferred: set[str]) -> _Room:
        """Free blocks, tokens and slots left for admissions once the running requests have taken their
        share of this step, as `_schedule_running` will give it (None blocks: one of them runs short)."""
        kv, bs = self.kv, self.kv.block_size
        free: int | None = kv.num_free_blocks
        tokens = self.config.max_num_batched_tokens
        decodes, partial = split
        for req in itertools.chain(decodes, partial):
            if tokens == 0 or free is None:
                break
            if req.status != RequestStatus.RUNNING or req.request_id in deferred:
                continue
            if req.num_tokens_to_compute == 1:
                n = 1
                held = kv.req_blocks.get(req.request_id)
                if held is not None and len(held) * bs >= req.num_tokens:
                    tokens -= 1  # a decode inside its last block takes no block
                    continue
            else:
                n = self._chunk(req, tokens)
                if n <= 0:
                    continue
            take = kv.blocks_to_take(req, n, num_free=free)
            free = None if take is None else free - take
            tokens -= n
        return _Room(free, tokens, self.config.max_num_seqs - self.num_slots_taken)

    def _admission_shortage(self, w: Request, room: _Room) -> str | None:
        """What keeps `w` from being admitted into `room` ("slot", "tokens", "blocks"), or None when it
        fits; then `room` is reduced by what it takes, for the requests behind it."""
        if room.slots < 1:
            return "slot"
        if room.blocks is None:
            return "blocks"
        if self.kv.is_swapped(w.request_id):
            need = self.kv.swap_in_blocks_needed(w)
            if not self._swap_in_fits(need, room.blocks, self.config.max_num_seqs - room.slots):
                return "blocks"
            room.blocks -= need
            room.slots -= 1
            return None
        hits = self.kv.get_computed_blocks(w, count=False)
        n = self._chunk(w, room.tokens, hits)
        if n <= 0:
            return "tokens"
        take = self.kv.blocks_to_take(w, n, hits, num_free=room.blocks)
        if take is None:
            return "blocks"
        room.blocks -= take
        room.tokens -= n
        room.slots -= 1
        return None

    def _victim_for(self, w: Request, shortage: str, deferred: set[str], now: float) -> Request | None:
        """The policy's victim among the running requests `w` outranks: among prompts that can still
        skip their chunk when tokens are short, among all of them otherwise."""
        candidates = self._preemptible()
        if shortage == "tokens":  # only a prompt chunk gives tokens back
            candidates = [r for r in candidates if r.num_tokens_to_compute > 1 and r.request_id not in deferred]
        return self.policy.victim_for(w, candidates, now) if candidates else None

    def _preemptible(self) -> list[Request]:
        """Running requests that can give up their KV now (not those whose swap-in is in flight)."""
        if not self.swapping_in:
            return self.running
        return [r for r in self.running if r.request_id not in self.swapping_in]

    def _chunk(self, req: Request, tokens_left: int, hits: list | tuple = ()) -> int:
        """Prompt tokens the request would compute this step (a waiting one after its prefix hits), as
        the policy chunks them within what the budget has left."""
        missing = req.num_tokens_to_compute - len(hits) * self.kv.block_size
        return min(self.policy.prefill_tokens(req, missing, tokens_left), tokens_left)

    @staticmethod
    def _swap_in_fits(num_blocks: int, num_free: int, num_running: int) -> bool:
        # Headroom of a block per running request: swapping back into a full pool would only swap
        # someone out again at the next block boundary (thrashing).
        return num_blocks + num_running <= num_free

    def _preempt(self, plan: StepPlan, req: Request) -> None:
        """Give up the request's KV and requeue it at its old place. Swap: its computed KV is copied to
        host memory and comes back on resumption. Recompute (or no host room): the KV is dropped and the
        request resumes by recomputing its tokens so far."""
        assert req.request_id not in self._in_plan, f"{req.request_id} is preempted while scheduled"
        self.running.remove(req)
        self.kv.uncache_uncomputed(req)
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
        self.policy.on_preempt(req)
        plan.preempted_ids.append(req.request_id)

    def _schedule_waiting(self, plan: StepPlan, budget: TokenBudget, now: float) -> None:
        # A swap-in computes nothing in this step (the request runs from the next one): with the budget
        # spent, swapped-out requests can still come back, as the look-ahead (_admission_shortage)
        # counts them. Otherwise return without asking the policy for its order (a pass over the queue).
        if self.num_slots_taken >= self.config.max_num_seqs or not self.waiting:
            return
        if budget.left == 0 and not self.kv.host_blocks:
            return
        admitted: list[Request] = []
        # Requests that gave way earlier in this step do not come back in it (the look-ahead that made
        # room for the ones above them did not count them either).
        gave_way = set(plan.preempted_ids)
        for req in self.policy.waiting_order(self.waiting, now):
            if self.num_slots_taken >= self.config.max_num_seqs:
                break
            if not self.policy.admit(req, now) or req.request_id in gave_way:
                continue
            if self.kv.is_swapped(req.request_id):
                if not self._room_for_swap_in(req, now):
                    break
                runs = self.kv.swap_in(req)
                if runs is None:
                    break
                # Runs from the next step on, once the executor reports its KV back on the device.
                plan.swap_in.extend(runs)
                plan.swap_in_ids.append(req.request_id)
                if runs:
                    self.swapping_in.add(req.request_id)
                else:
                    # Every block was still on the device (prefix hits): no copy lands, so none is
                    # waited for (an executor reports only the copies it made; on CUDA this request
                    # would sit out every step, never reported).
                    self.kv.swap_in_landed(req.request_id)
                self.num_swap_ins += 1
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                admitted.append(req)
                self.policy.on_admit(req, now)
                continue
            if budget.left == 0:
                break  # keep the policy's order: nothing behind a request short of tokens jumps it
            hits = self.kv.get_computed_blocks(req)
            n = self._chunk(req, budget.left, hits)
            if n <= 0:
                break
            while not (ok := self.kv.allocate_slots(req, n, hits)):
                if not self._may_drop_pins(req, now) or not self.kv.drop_pin(req.program, hits):
                    break
            if not ok:
                break  # keep the policy's order: nothing jumps the head of the queue
            if self.kv.pins:
                self.kv.unpin(req.program)  # the program's next call holds its blocks now
            num_cached = len(hits) * self.kv.block_size
            req.num_computed_tokens = num_cached
            if req.times.first_scheduled is None:
                req.times.first_scheduled = now
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            admitted.append(req)
            self.policy.on_admit(req, now)
            self._add(plan, budget, req, n)
        for req in admitted:
            self.waiting.remove(req)

    def _room_for_swap_in(self, req: Request, now: float) -> bool:
        """Whether the swapped-out `req` fits now; pins give way for it as for a new call's prompt (else,
        with nothing running, nothing would ever free the blocks it waits for)."""
        need = self.kv.swap_in_blocks_needed(req)
        while not self._swap_in_fits(need, self.kv.num_free_blocks, self.num_slots_taken):
            if not self._may_drop_pins(req, now) or not self.kv.drop_pin(req.program):
                return False
        return True

    def _may_drop_pins(self, req: Request, now: float) -> bool:
        """Whether pins may give way for `req` to be admitted (other programs' first, then its own where
        it holds blocks `req` will not reuse): when the policy allows it (a tail guard), and always when
        nothing runs (then no finishing request would ever make room)."""
        return bool(self.kv.pins) and (not self.running or self.policy.may_drop_pins(req, now))

    # ---- runs of identical decode steps ---------------------------------------------------------------
    def decode_run(self, token_id: int, limit: int) -> tuple[int, list[int]]:
        """How many of the next steps, up to `limit`, provably have the same kind of plan: every running
        request decodes one token, but maybe the last admitted one, which computes the rest of its prompt
        in chunks first (then decodes too), and nothing is admitted or preempted, while the tokens sampled
        are `token_id` (what a SimExecutor samples) except maybe in the last step, the only one in which a
        request may stop (by its length, or by the token sampled there). Returns (steps, chunks): the
        prompt's chunk in each of the run's first len(chunks) steps ([] when every request decodes);
        (0, []) when the next step may differ.

        A simulator advances that many steps at once (`apply_decode_run`), and the schedule stays this
        scheduler's: it only skips re-deriving plans it can tell in advance. Arrivals are the caller's to
        respect: it applies only the steps that begin before the next one. Conditions: the policy allows
        it (with a prompt: `allows_prefill_runs`, no pins); no swap-in in flight; the budget holds every
        decode (and leaves the prompt a token); nothing waits, or (for a policy that never preempts)
        what waits cannot be admitted until a slot frees; the KV pool holds every block the run can take."""
        running = self.running
        none: tuple[int, list[int]] = (0, [])
        if limit < 1 or not running or self.swapping_in or not self.policy.allows_decode_runs():
            return none
        cfg = self.config
        if len(running) > cfg.max_num_batched_tokens:
            return none
        if self.waiting and (
            type(self.policy).may_preempt is not Policy.may_preempt
            or (self.num_slots_taken < cfg.max_num_seqs and len(running) < cfg.max_num_batched_tokens)
        ):
            return none
        prompt = running[-1]
        chunks: list[int] = []
        others = itertools.islice(running, len(running) - 1)
        if any(len(r.all_token_ids) - r.num_computed_tokens != 1 for r in others):
            return none  # a prompt is still being computed, other than the last admitted request's
        missing = len(prompt.all_token_ids) - prompt.num_computed_tokens
        if missing != 1:
            if self.kv.pins or not self.policy.allows_prefill_runs():
                return none
            # Its chunks as _schedule_running gives them: what the budget leaves after the decodes.
            left = cfg.max_num_batched_tokens - (len(running) - 1)
            while missing > 0 and len(chunks) < limit:
                n = min(self.policy.prefill_tokens(prompt, missing, left), left)
                if n <= 0:
                    break
                chunks.append(n)
                missing -= n
            if missing > 0:
                limit = len(chunks)  # a chunk the step after would not take: the run stops before it
            if limit < 1:
                return none
        decodes = itertools.islice(running, len(running) - 1) if chunks else running
        for req in decodes:  # a stop by length may come in the last step only
            limit = min(limit, req.tokens_before_stop(token_id) + 1)
        if chunks:  # the prompt samples its first token in its last chunk's step
            limit = min(limit, len(chunks) + prompt.tokens_before_stop(token_id))
        n = self.kv.max_decode_run(running, limit, chunks)
        return n, chunks[:n]

    def apply_decode_run(
        self,
        token_id: int,
        starts: Sequence[float],
        ends: Sequence[float],
        last_tokens: Mapping[str, int] | None = None,
        before_last_step: Callable[[], None] | None = None,
        chunks: Sequence[int] = (),
    ) -> list[Request]:
        """Carry out `len(ends)` steps that `decode_run` allowed, with the given start and end clock times,
        every request sampling `token_id` but in the last step `last_tokens` (request id -> token, where
        it differs), the last running request computing `chunks` in the first len(chunks) steps (those
        `decode_run` gave, cut to the steps carried out): what as many schedule/update rounds would do,
        token for token (timestamps, KV blocks, prefix index, step ids, stops). Returns the requests that
        stopped in the last step. Requests that finished reach the executor with the next plan.
        `before_last_step` is called where the KV pool reads as after the step before the last (see
        KVCacheManager.decode_run)."""
        m = len(ends)
        assert 0 < m == len(starts) and len(chunks) <= m
        tokens = [token_id] * m
        running = list(self.running)
        prompt = running[-1] if chunks else None
        # The prompt samples from its last chunk's step on, if that chunk completes it.
        first = first_sample_step(prompt, chunks) if prompt is not None else None
        first_sample = m if first is None else first
        sampled: list[Request] = []
        for req in running:
            samples, at = (tokens, ends) if req is not prompt else (tokens[first_sample:], ends[first_sample:])
            if not samples:
                continue  # the prompt is still being computed
            last = token_id if last_tokens is None else last_tokens.get(req.request_id, token_id)
            if last != token_id:
                samples[-1] = last
            req.output_token_ids.extend(samples)
            req.all_token_ids.extend(samples)
            samples[-1] = token_id
            times = req.times
            if times.first_token is None:  # a prompt whose last token was computed in this run
                times.first_token = at[0]
            times.tokens.extend(at)
            sampled.append(req)
        self.kv.decode_run(running, m, before_last_step, chunks)
        for req in running:
            req.num_computed_tokens += m
        if prompt is not None:  # it computed its chunks, then decoded one token a step
            prompt.num_computed_tokens += sum(chunks) - len(chunks)
        self._step_id += m
        self._step_start = starts[-1]
        if self.kv.pins:
            self.kv.expire_pins(starts[-1])  # pins that ran out during the run (no step allocated from them)
        self.policy.on_schedule(starts[-1])
        # As update() after the last step: no earlier step could stop anyone (decode_run's bound).
        stopped = [(req, status) for req in sampled if (status := req.check_stop()) is not None]
        for req, status in stopped:
            self.finish_request(req, status, ends[-1])
        return [req for req, _ in stopped]

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
        # Their copies never started, or the executor orders later copies after them.
        for request_id in plan.swap_in_ids:
            self.kv.swap_in_landed(request_id)
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
            self.kv.swap_in_landed(request_id)

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
        for request_id, req in self.migrating_out.items():
            assert request_id not in self.requests
            assert req.finished == (request_id not in self.kv.req_blocks), f"stopped {request_id}: KV"
        assert not self.kv.reserved.keys() & self.requests.keys(), "a request holds a migration reservation"
        assert self.num_slots_taken <= self.config.max_num_seqs
