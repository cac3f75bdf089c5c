"""EngineCore: schedule -> execute -> update, with the executor and the clock injected.

The real engine (ModelExecutor, WallClock) and the simulator (a cost-model executor, VirtualClock) are
both this class; nothing here knows which one it is.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from quanta.cluster.state import InstanceState, RunningInfo
from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import Clock
from quanta.executor.base import DecodeRunExecutor, Executor, StepResult
from quanta.kv.manager import KVCacheManager, cdiv
from quanta.request import Request, RequestStatus
from quanta.sched.plan import StepPlan
from quanta.sched.policy import Policy, make_policy
from quanta.sched.scheduler import Scheduler


class StepFailedError(RuntimeError):
    """The executor could not run a step. The scheduler has aborted the step's requests (their KV freed and
    kept out of the prefix index); every other request is untouched, so the engine can go on serving.

    `request_ids` names the aborted requests; the executor's exception is `__cause__`.
    """

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed: {cause}")
        self.request_ids = request_ids


@dataclass(slots=True)
class StepOutput:
    plan: StepPlan
    result: StepResult
    updated: list[Request]  # requests that received a token this step (possibly now finished)
    start: float  # clock time the step began
    end: float


@dataclass(slots=True)
class DecodeRun:
    """Steps whose plans are known in advance (every running request decodes a token, but maybe the last
    admitted, which computes its prompt's chunks first), priced but not yet applied: `apply_decode_run`
    carries out any prefix of them. Requests may stop in the last step only. Times stay arrays: a run is
    often cut short by an arrival, and only what is applied becomes floats."""

    token_id: int  # what every request samples, but in the last step
    last_tokens: dict[str, int]  # request id -> token sampled in the last step, where not token_id
    times: np.ndarray  # clock time each step begins, then the time the last one ends (len(run) + 1)
    chunks: list[int] = field(default_factory=list)  # the last running request's chunk in the first steps

    def __len__(self) -> int:
        return len(self.times) - 1

    @property
    def starts(self) -> np.ndarray:
        return self.times[:-1]

    @property
    def ends(self) -> np.ndarray:
        return self.times[1:]

    def start(self, k: int) -> float:
        """When step k begins (k < 0 counts from the last)."""
        return float(self.starts[k])

    def end(self, k: int) -> float:
        """When step k ends (k < 0 counts from the last)."""
        return float(self.ends[k])

    def tail(self, k: int) -> DecodeRun:
        """The run from its step k on (once the first k are applied)."""
        return DecodeRun(self.token_id, self.last_tokens, self.times[k:], self.chunks[k:])

    def num_tokens(self, num_steps: int, num_running: int) -> int:
        """Tokens computed in the first `num_steps` steps, `num_running` requests running."""
        chunks = self.chunks[:num_steps]
        return num_steps * num_running + sum(chunks) - len(chunks)

    def steps_before(self, t: float) -> int:
        """Steps that begin before time t (an arrival at t is admitted before a step that begins at t)."""
        return int(np.searchsorted(self.starts, t, side="left"))


class EngineCore:
    def __init__(
        self,
        executor: Executor,
        clock: Clock,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        policy: Policy | None = None,
        check_integrity: bool = False,
    ) -> None:
        num_blocks = executor.num_kv_blocks
        bs = cache_config.block_size
        if num_blocks * bs < scheduler_config.max_model_len:
            raise ValueError(
                f"the KV pool holds {num_blocks * bs} tokens, less than max_model_len "
                f"({scheduler_config.max_model_len}): give it more memory or lower max_model_len"
            )
        self.executor = executor
        self.clock = clock
        self.kv = KVCacheManager(
            num_blocks,
            bs,
            cache_config.enable_prefix_caching,
            num_host_blocks=getattr(executor, "num_host_kv_blocks", 0),
            block_groups=cache_config.block_groups,
            per_tenant=cache_config.prefix_cache_per_tenant,
            hash_algo=cache_config.prefix_cache_hash,
            private_prompts=cache_config.private_prompts,
        )
        self.policy = policy or make_policy(scheduler_config.policy, scheduler_config)
        self.scheduler = Scheduler(scheduler_config, self.kv, self.policy)
        self.check_integrity = check_integrity
        self.step_observers: list[Callable[[StepOutput], None]] = []
        self.num_steps = 0
        self.num_added = 0  # add_request calls (InstanceState.num_added)
        assert cdiv(scheduler_config.max_model_len, bs) <= num_blocks

    def add_request(self, req: Request) -> None:
        self.num_added += 1  # counted even when refused: the cluster counted the dispatch
        self.scheduler.add_request(req)

    def instance_state(self, instance_id: int = 0, draining: bool = False, detail: bool = True) -> InstanceState:
        """A snapshot for the cluster's global scheduler (between steps). The prefix hashes it carries are
        those indexed and evicted since the previous call (or the whole index: see InstanceState.hashes_whole). Without
        `detail`, only the counts (requests, blocks): no per-request data, queue demand or hashes."""
        sched, kv = self.scheduler, self.kv
        bs = kv.block_size
        now = self.clock.now()
        running: list[RunningInfo] = []
        decodes = context = uncomputed = high = 0
        for r in sched.running if detail else ():
            n = r.num_tokens
            decoding = n - r.num_computed_tokens == 1
            decodes += decoding
            context += r.num_computed_tokens
            if r.num_computed_tokens < r.num_prompt_tokens:
                uncomputed += r.num_prompt_tokens - r.num_computed_tokens
            high += r.priority < 0
            blocks = kv.req_blocks.get(r.request_id, ())
            running.append(RunningInfo(r.request_id, n, len(blocks), decoding, r.priority, r.arrival_time))
        hol = demand = preempted = 0
        if sched.waiting and detail:
            head = next(itertools.islice(self.policy.waiting_order(sched.waiting, now), 1), None)
            if head is not None:
                hits = kv.get_computed_blocks(head, count=False)
                hol = max(cdiv(head.num_tokens, bs) - len(hits), 0)
            for w in sched.waiting:
                demand += cdiv(w.num_tokens, bs)
                uncomputed += w.num_tokens - w.num_computed_tokens
                high += w.priority < 0
                preempted += w.status == RequestStatus.PREEMPTED
        stored, evicted, whole = kv.pool.drain_hash_log() if kv.enable_caching and detail else ([], [], False)
        return InstanceState(
            instance_id=instance_id,
            time=now,
            block_size=bs,
            num_blocks=kv.num_blocks,
            num_free_blocks=kv.num_free_blocks,
            watermark_blocks=kv.num_blocks // 100,
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            hol_demand_blocks=hol,
            waiting_demand_blocks=demand,
            uncomputed_prefill_tokens=uncomputed,
            decode_batch_size=decodes,
            sum_context_tokens=context,
            num_high_priority=high,
            num_preempted_waiting=preempted,
            num_preemptions=sched.num_preemptions,
            num_added=self.num_added,
            draining=draining,
            running=running,
            stored_hashes=stored,
            evicted_hashes=evicted,
            hashes_whole=whole,
            migrating=[*sched.migrating_out, *kv.reserved],
        )

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Stop a request for a reason found outside the scheduler (a stop string)."""
        req = self.scheduler.requests.get(request_id)
        if req is not None and not req.finished:
            self.scheduler.finish_request(req, status, self.clock.now())
        else:  # stopped for its migration's last stage: it must not resume here if the migration fails
            self.scheduler.finish_migrating_out(request_id, status)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def idle_wait(self) -> float | None:
        """Seconds until an idle engine has something to do by itself (a KV pin's time-to-live running
        out), or None: a loop waiting for requests wakes by then and calls `on_idle`."""
        expiry = self.kv.next_pin_expiry
        return None if math.isinf(expiry) else max(expiry - self.clock.now(), 0.0)

    def on_idle(self) -> None:
        """Between requests: release the pins whose time-to-live has passed (only a step or an arrival
        did, so an idle engine kept them, and their blocks, for good)."""
        if self.kv.pins:
            self.kv.expire_pins(self.clock.now())

    def decode_run(self, limit: int) -> DecodeRun | None:
        """The next steps, up to `limit`, if their plans are known in advance (Scheduler.decode_run: pure
        decodes, maybe with one prompt's chunks first) and the executor can price them without plans (a
        simulator's); None otherwise (then `step` as usual). Assumes no
        request arrives before the run ends: the caller applies only the steps that begin before the
        next arrival."""
        if not hasattr(self.executor, "decode_run"):
            return None
        executor = cast(DecodeRunExecutor, self.executor)
        token_id = executor.token_id
        n, chunks = self.scheduler.decode_run(token_id, limit)
        if n < 2:
            return None
        durations, last_tokens = executor.decode_run(self.scheduler.running, n, chunks)
        if len(durations) < 2:
            return None
        # The clock's own arithmetic, so that times match step() to the last bit: accumulate adds in
        # sequence (t0 + d0) + d1 ..., as VirtualClock.advance would.
        times = np.add.accumulate(np.concatenate(([self.clock.now()], durations)))
        return DecodeRun(token_id, last_tokens, times, chunks[: len(durations)])

    def apply_decode_run(
        self, run: DecodeRun, num_steps: int | None = None, before_last_step: Callable[[], None] | None = None
    ) -> list[Request]:
        """Carry out the first `num_steps` (default: all) steps of `run`, as `step` would have, but
        without building plans (step observers do not see them). Returns the requests that finished
        (only in the run's last step). `before_last_step` is called where the KV pool reads as after the
        step before the last one applied (its usage then: the run's peak)."""
        m = len(run) if num_steps is None else num_steps
        if m == 0:
            return []
        assert self.clock.now() == run.times[0], "the engine moved since the run was planned"
        # As C doubles: every request's timestamps extend from them in one copy.
        times = array("d", run.times[: m + 1].tobytes())
        # The run's times are the clock's own sums (decode_run): moving it there is advancing it m times.
        self.clock.wait_until(times[-1])
        assert self.clock.now() == times[-1], "decode runs need a virtual clock"
        last = run.last_tokens if m == len(run) else None
        finished = self.scheduler.apply_decode_run(
            run.token_id, times[:-1], times[1:], last, before_last_step, run.chunks[:m]
        )
        self.num_steps += m
        if self.check_integrity:
            self.scheduler.check_integrity()
        return finished

    def step(self) -> StepOutput:
        start = self.clock.now()
        plan = self.scheduler.schedule(start)
        try:
            result = self.executor.execute(plan)
        except Exception as e:
            failed = self.scheduler.fail_step(plan, self.clock.now())
            raise StepFailedError([r.request_id for r in failed], e) from e
        self.clock.advance(result.elapsed)
        end = self.clock.now()
        self.scheduler.swaps_done(result.swapped_in_ids)
        updated = self.scheduler.update(plan, result.sampled_token_ids, end)
        self.num_steps += 1
        if self.check_integrity:
            self.scheduler.check_integrity()
        out = StepOutput(plan, result, updated, start, end)
        for observe in self.step_observers:
            observe(out)
        return out
