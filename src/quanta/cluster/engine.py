"""ClusterEngine: one front end over N engine instances (Ray actors, or workers in this process).

The front end keeps everything about text (tokenizer, chat template, detokenization, stop strings) and a
mirror of every live request: its outputs so far, its timestamps, and which instance owns it. Instances
send token ids only. Because the mirror counts each request's outputs, a token arriving twice (from a
migration's source and then its destination) or from an instance that no longer owns the request is
dropped, and a request whose instance died is sent, with its outputs so far, to another instance that
recomputes its KV and goes on: the client's stream never notices either.

It is an `EngineFrontend`, like LLMEngine, so the OpenAI server and the offline `LLM` run on it unchanged.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from quanta.cluster.instances import InstanceDiedError, Instances
from quanta.cluster.worker import TokenRecord, cluster_clock
from quanta.engine.core import StepFailedError, StepOutput
from quanta.engine.llm_engine import CacheCounters, EngineArgs, EngineFrontend, EngineState
from quanta.engine.output import RequestOutput
from quanta.executor.base import StepResult
from quanta.request import Request, RequestStatus
from quanta.sched.plan import StepPlan

logger = logging.getLogger("quanta.cluster")

# How long one step() waits for any instance's tokens: short, so that new requests (which the server's
# engine thread adds between steps) wait at most this long to be dispatched.
POLL_WAIT_S = 0.005
# How long an instance's poll waits on its side for something to report.
POLL_HOLD_S = 0.05


class ClusterEngine(EngineFrontend):
    def __init__(
        self,
        args: EngineArgs,
        instances: Instances | None = None,
        *,
        num_instances: int = 2,
        ray_address: str | None = None,
        epoch: float | None = None,
    ) -> None:
        super().__init__(args)
        args = self.args
        self.epoch = time.time() if epoch is None else epoch
        self.clock = cluster_clock(self.epoch)
        if instances is None:
            from quanta.cluster.ray_instances import RayInstances

            instances = RayInstances(args, num_instances, self.epoch, address=ray_address)
        self.instances = instances
        n = instances.num_instances
        infos = [instances.result(i, instances.submit(i, "info")) for i in range(n)]
        self._max_model_len = min(info["max_model_len"] for info in infos)
        self.num_blocks = [info["num_blocks"] for info in infos]
        self.alive = [True] * n
        self.live: dict[str, Request] = {}  # mirror of every unfinished request (one per sample)
        self.owner: dict[str, int] = {}  # request id -> the instance that runs it
        self._polls: dict[int, Any] = {}  # instance -> its outstanding poll
        self._observers: list[Callable[[StepOutput], None]] = []
        self._carry: list[RequestOutput] = []  # outputs of a step that also had failures
        self._counters: list[CacheCounters] = [CacheCounters(0, 0, 0) for _ in range(n)]
        self._lost: list[str] = []  # requests no instance could take (all dead): failed at the next step
        self.num_redispatched = 0  # requests recomputed elsewhere after their instance died

    # ---- EngineFrontend ---------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def now(self) -> float:
        return self.clock.now()

    def _submit(self, children: list[Request]) -> None:
        added: list[Request] = []
        try:
            for index, group in self._dispatch(children).items():
                self._add_to(index, group)
                added.extend(group)
        except BaseException:  # all or none: take back the ones already admitted
            for req in added:
                self._tell(self.owner[req.request_id], "abort", [req.request_id])
            for child in children:
                self.owner.pop(child.request_id, None)
            raise
        for child in children:
            self.live[child.request_id] = child

    def _add_to(self, index: int, group: list[Request]) -> None:
        """Admit a group on an instance; if it is dead, on others."""
        try:
            self.instances.result(index, self.instances.submit(index, "add", group))
        except InstanceDiedError:
            self._instance_died(index)
            for again, rest in self._dispatch(group).items():
                self._add_to(again, rest)

    def _abort(self, child_ids: list[str]) -> None:
        by_owner: dict[int, list[str]] = defaultdict(list)
        for cid in child_ids:
            req = self.live.pop(cid, None)
            owner = self.owner.pop(cid, None)
            if req is not None and not req.finished:
                req.status = RequestStatus.FINISHED_ABORTED
                req.times.finished = self.now()
            if owner is not None:
                by_owner[owner].append(cid)
        for index, ids in by_owner.items():
            self._tell(index, "abort", ids)

    def finish_request(self, child_id: str, status: RequestStatus) -> None:
        req = self.live.pop(child_id, None)
        if req is None or req.finished:
            return
        req.status = status
        req.times.finished = self.now()
        owner = self.owner.pop(child_id, None)
        if owner is not None:
            self._tell(owner, "finish", [child_id], int(status))

    def has_unfinished_requests(self) -> bool:
        return bool(self.live) or bool(self._carry)

    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Gather what the instances did since the last call (waiting briefly for something) and turn it
        into outputs, as LLMEngine.step does for one engine step. Requests an instance lost to a failed
        step raise StepFailedError after the others' outputs are kept for the next call."""
        outputs, self._carry = self._carry, []
        records: list[tuple[int, TokenRecord]] = []
        for index in range(self.instances.num_instances):
            if self.alive[index] and index not in self._polls:
                self._polls[index] = self.instances.submit(index, "poll", POLL_HOLD_S)
        if self._polls:
            ready = set(self.instances.wait(list(self._polls.values()), POLL_WAIT_S))
            for index, fut in list(self._polls.items()):
                if fut not in ready:
                    continue
                del self._polls[index]
                try:
                    records.extend((index, r) for r in self.instances.result(index, fut))
                except Exception as e:  # the actor died, or its step thread did
                    logger.error("instance %d failed: %s", index, e)
                    self._instance_died(index)
        failed = self._apply(records, only_finished, outputs)
        if failed:
            self._carry = outputs
            parents = self._drop_failed(failed)
            raise StepFailedError(parents, RuntimeError("an instance could not run a step"))
        return outputs

    def state(self, check: bool = True) -> EngineState:
        states = self._instance_states(check)
        live = [s for s in states if s.get("alive")]
        num_blocks = sum(s["num_blocks"] for s in live)
        free = sum(s["num_free_blocks"] for s in live)
        errors = [f"instance {s['index']}: {s['integrity_error']}" for s in live if not s["integrity_ok"]]
        return EngineState(
            num_running=sum(s["num_running"] for s in live),
            num_waiting=sum(s["num_waiting"] for s in live),
            num_free_blocks=free,
            num_blocks=num_blocks,
            kv_usage=1.0 - free / num_blocks if num_blocks else 0.0,
            integrity_ok=not errors,
            integrity_error="; ".join(errors) or None,
            waiting_prompt_tokens=sum(s["waiting_prompt_tokens"] for s in live),
            instances=states,
            cluster={"ray_address": self.instances.address, "redispatched": self.num_redispatched},
        )

    def waiting_load(self) -> tuple[int, int]:
        waiting = [r for r in self.live.values() if not r.output_token_ids]
        return len(waiting), sum(r.num_prompt_tokens for r in waiting)

    def counters(self) -> CacheCounters:
        c = self._counters
        return CacheCounters(
            sum(x.prefix_queries for x in c), sum(x.prefix_hits for x in c), sum(x.preemptions for x in c)
        )

    def add_step_observer(self, observe: Callable[[StepOutput], None]) -> None:
        self._observers.append(observe)

    def reset_prefix_cache(self) -> bool:
        futs = [(i, self.instances.submit(i, "reset_prefix_cache")) for i in self._alive_indices()]
        return all([self.instances.result(i, f) for i, f in futs])

    def shutdown(self) -> None:
        self.instances.shutdown()

    # ---- instances ------------------------------------------------------------------------------------
    def _alive_indices(self) -> list[int]:
        return [i for i, ok in enumerate(self.alive) if ok]

    def _dispatch(self, requests: list[Request]) -> dict[int, list[Request]]:
        """Choose each request's instance: the live one running the fewest requests."""
        alive = self._alive_indices()
        if not alive:
            raise RuntimeError("no engine instance is alive")
        load = dict.fromkeys(alive, 0)
        for owner in self.owner.values():
            if owner in load:
                load[owner] += 1
        placed: dict[int, list[Request]] = defaultdict(list)
        for req in requests:
            index = min(alive, key=lambda i: load[i])
            load[index] += 1
            self.owner[req.request_id] = index
            placed[index].append(req)
        return placed

    def _tell(self, index: int, method: str, *args: Any) -> None:
        """A call whose answer nobody waits for (an instance that died meanwhile is noticed by its poll)."""
        if self.alive[index]:
            self.instances.submit(index, method, *args)

    def _instance_states(self, check: bool) -> list[dict[str, Any]]:
        names = self.instances.names()
        futs = {i: self.instances.submit(i, "kv_state", check) for i in self._alive_indices()}
        states = []
        for i in range(self.instances.num_instances):
            s: dict[str, Any] = {"index": i, "name": names[i], "alive": False}
            if i in futs:
                try:
                    s.update(self.instances.result(i, futs[i]), alive=True)
                    self._counters[i] = CacheCounters(s["prefix_queries"], s["prefix_hits"], s["preemptions"])
                except Exception as e:
                    logger.error("instance %d failed: %s", i, e)
                    self._instance_died(i)
            s["owned_requests"] = sum(1 for o in self.owner.values() if o == i)
            states.append(s)
        return states

    def _instance_died(self, index: int) -> None:
        """Send the dead instance's requests, with their outputs so far, to live instances: they recompute
        the KV (as after a preemption) and go on."""
        if not self.alive[index]:
            return
        self.alive[index] = False
        self._polls.pop(index, None)
        orphans = [self.live[cid] for cid, o in self.owner.items() if o == index and cid in self.live]
        logger.warning("instance %d is gone: re-dispatching its %d requests", index, len(orphans))
        if not self._alive_indices():
            self._carry_failure([r.request_id for r in orphans], "every engine instance is gone")
            return
        for req in orphans:
            self.owner.pop(req.request_id, None)
        for target, group in self._dispatch([_recomputable(r) for r in orphans]).items():
            self._add_to(target, group)
        self.num_redispatched += len(orphans)

    def _carry_failure(self, child_ids: list[str], message: str) -> None:
        for cid in child_ids:
            self.owner.pop(cid, None)
        self._lost.extend(child_ids)
        logger.error("%s: %d requests lost", message, len(child_ids))

    # ---- outputs ------------------------------------------------------------------------------------------
    def _apply(
        self, records: list[tuple[int, TokenRecord]], only_finished: bool, outputs: list[RequestOutput]
    ) -> list[str]:
        """Fold the instances' records into the mirror, one token per request at a time (the output
        processor's unit), and collect the outputs. Returns the requests an instance lost."""
        failed, self._lost = self._lost, []
        now = self.now()
        depth = max((max(len(r.token_ids), len(r.prompt_logprobs), 1) for _, r in records), default=0)
        for j in range(depth):
            updated: list[Request] = []
            result = StepResult({}, 0.0)
            for index, rec in records:
                req = self.live.get(rec.request_id)
                if req is None:
                    continue
                owns = self.owner.get(rec.request_id) == index
                if j < len(rec.prompt_logprobs) and owns:
                    result.prompt_logprobs[rec.request_id] = rec.prompt_logprobs[j]
                if j < len(rec.token_ids) and rec.start + j == req.num_output_tokens:
                    req.append_output_token(rec.token_ids[j], rec.times[j])
                    if rec.logprobs is not None:
                        result.logprobs[rec.request_id] = rec.logprobs[j]
                    updated.append(req)
                if owns and j == max(len(rec.token_ids), 1) - 1:
                    if rec.error is not None:
                        failed.append(rec.request_id)
                        continue
                    _copy_state(rec, req)
            step = StepOutput(_EMPTY_PLAN, result, updated, now, now)
            for observe in self._observers:
                observe(step)
            outputs.extend(self.output_processor.process(step, only_finished=only_finished))
            for req in updated:
                if req.finished:
                    self.live.pop(req.request_id, None)
                    self.owner.pop(req.request_id, None)
        return failed


_EMPTY_PLAN = StepPlan(step_id=-1)  # the observers read only the updated requests


def _copy_state(rec: TokenRecord, req: Request) -> None:
    if rec.first_scheduled is not None and req.times.first_scheduled is None:
        req.times.first_scheduled = rec.first_scheduled
    req.num_cached_tokens = max(req.num_cached_tokens, rec.num_cached_tokens)
    req.num_preemptions = max(req.num_preemptions, rec.num_preemptions)
    status = RequestStatus(rec.status)
    if status.finished and not req.finished:
        req.status = status
        req.stop_reason = rec.stop_reason
        req.times.finished = rec.finished_time


def _recomputable(req: Request) -> Request:
    """A copy of a mirror request that an instance can admit and recompute from its outputs so far."""
    again = copy.copy(req)
    again.output_token_ids = list(req.output_token_ids)
    again.all_token_ids = list(req.all_token_ids)
    again.num_computed_tokens = 0
    again.status = RequestStatus.WAITING
    return again
