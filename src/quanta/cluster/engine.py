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

import concurrent.futures
import copy
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from quanta.cluster.instances import InstanceDiedError, Instances
from quanta.cluster.migration import Migration
from quanta.cluster.remote import RemoteEndpoint
from quanta.cluster.rescheduler import Rescheduler
from quanta.cluster.router import dispatch, make_router
from quanta.cluster.view import ClusterView
from quanta.cluster.worker import TokenRecord, cluster_clock
from quanta.engine.core import StepFailedError, StepOutput
from quanta.engine.llm_engine import CacheCounters, EngineArgs, EngineFrontend, EngineState
from quanta.engine.output import RequestOutput
from quanta.executor.base import StepResult
from quanta.kv.manager import cdiv
from quanta.request import Request, RequestStatus
from quanta.sched.plan import StepPlan

logger = logging.getLogger("quanta.cluster")

# How long one step() waits for any instance's tokens: short, so that new requests (which the server's
# engine thread adds between steps) wait at most this long to be dispatched.
POLL_WAIT_S = 0.005
# How long an instance's poll waits on its side for something to report.
POLL_HOLD_S = 0.05
# How often the controller refreshes its view of the instances (Llumnix polls every 50 ms).
STATE_PERIOD_S = 0.05
# A destination frees a reservation no migration call has touched for this long (its source died).
WATCHDOG_S = 10.0
# Tokens that reach the front end ahead of earlier ones (a migration's destination reporting before its
# source's last poll) wait this long for the gap to fill before the stop snapshot fills it.
GAP_WAIT_S = 1.0
# /health asks the instances at most this often (an idle cluster notices no death between its steps) and
# waits this long for their answers.
HEALTH_PERIOD_S = 1.0
HEALTH_WAIT_S = 0.5


class ClusterEngine(EngineFrontend):
    def __init__(
        self,
        args: EngineArgs,
        instances: Instances | None = None,
        *,
        num_instances: int = 2,
        ray_address: str | None = None,
        epoch: float | None = None,
        router: str = "least-load",
        migration: bool = False,
        rescheduler: Rescheduler | None = None,
    ) -> None:
        """`router`: a name from `quanta.cluster.router.router_names()`. `migration`: let the Llumnix
        rescheduler (default: defrag pairing on freeness) move running requests between instances;
        `migrate()` moves one on demand either way."""
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
        self._health: tuple[float, bool] = (-HEALTH_PERIOD_S, True)  # (when asked, whether any answered)
        self.live: dict[str, Request] = {}  # mirror of every unfinished request (one per sample)
        self.owner: dict[str, int] = {}  # request id -> the instance that runs it
        self._polls: dict[int, Any] = {}  # instance -> its outstanding poll
        self._observers: list[Callable[[StepOutput], None]] = []
        self._carry: list[RequestOutput] = []  # outputs of a step that also had failures
        self._counters: list[CacheCounters] = [CacheCounters(0, 0, 0) for _ in range(n)]
        self._lost: list[str] = []  # requests no instance could take (all dead): failed at the next step
        self.num_redispatched = 0  # requests recomputed elsewhere after their instance died
        self.router = make_router(router)
        self.rescheduler = rescheduler or (Rescheduler() if migration else None)
        self.view = ClusterView(args.block_size, args.prefix_cache_per_tenant, args.prefix_cache_hash)
        for i in range(n):
            self.view.update(instances.result(i, instances.submit(i, "instance_state")))
        self._state_polls: dict[int, Any] = {}
        self._last_poll = self.now()
        self.migrations: dict[str, Migration] = {}  # in flight, by request id
        self._migration_runs: dict[str, concurrent.futures.Future] = {}
        self._migration_pool = concurrent.futures.ThreadPoolExecutor(max(1, n // 2), "quanta-migration")
        self.done_migrations: list[Migration] = []  # finished (committed or aborted), for reports
        self._held: list[tuple[int, TokenRecord]] = []  # (instance, tokens after a gap in the outputs)
        self._gap_since: dict[str, float] = {}  # request id -> when its gap was first seen
        self._fill: dict[str, TokenRecord] = {}  # request id -> its outputs at its migration's stop

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
            m = self.migrations.get(cid)
            if m is not None:  # its reservation, or its committed copy, on the destination
                by_owner[m.dst].append(cid)
            self.router.forget(cid)
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
        m = self.migrations.get(child_id)
        if m is not None:
            self._tell(m.dst, "abort", [child_id])
        self.router.forget(child_id)

    def has_unfinished_requests(self) -> bool:
        # Migrations in flight too: only `step` settles them (a request that finished mid-migration
        # leaves one to collect, and its destination's reservation to free, on an idle cluster).
        return bool(self.live or self._carry or self.migrations or self._migration_runs)

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
        self._control()
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
            cluster={
                "ray_address": self.instances.address,
                "router": self.router.name,
                "migration": self.rescheduler is not None,
                "redispatched": self.num_redispatched,
                **self.migration_stats(),
            },
            counters=self.counters(),  # refreshed by the instances' states just read
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
        self._migration_pool.shutdown(wait=False, cancel_futures=True)
        self.instances.shutdown()

    def healthy(self) -> bool:
        """Whether some instance answers (asked at most every HEALTH_PERIOD_S: the engine thread learns of
        a death only from a call that fails, and an idle cluster makes none). Read-only: the engine
        thread still handles the death at its next call to that instance."""
        if not any(self.alive):
            return False
        asked, ok = self._health
        now = time.monotonic()
        if now - asked < HEALTH_PERIOD_S:
            return ok
        futs = {i: self.instances.submit(i, "info") for i in self._alive_indices()}
        deadline = now + HEALTH_WAIT_S
        ok = False
        for i, fut in futs.items():
            if not self.instances.wait([fut], max(deadline - time.monotonic(), 0.0)):
                ok = True  # no answer yet: a busy instance (a long step holds the call), not a dead one
                break
            try:
                self.instances.result(i, fut)
                ok = True
                break
            except Exception:  # gone
                continue
        self._health = (time.monotonic(), ok)
        return ok

    # ---- instances ------------------------------------------------------------------------------------
    def _alive_indices(self) -> list[int]:
        return [i for i, ok in enumerate(self.alive) if ok]

    def _dispatch(self, requests: list[Request]) -> dict[int, list[Request]]:
        """Choose each request's instance with the router, counting each dispatch in the view at once."""
        placed: dict[int, list[Request]] = defaultdict(list)
        for req in requests:
            index = dispatch(self.router, self.view, req)
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
        self._state_polls.pop(index, None)
        self.view.remove(index)
        for m in list(self.migrations.values()):
            if index in (m.src, m.dst):
                self._end_migration(m, f"instance {index} died")
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

    # ---- controller: view, rescheduling, migrations --------------------------------------------------
    def _control(self) -> None:
        """Between two gatherings of tokens: refresh the view on its period (without waiting for slow
        instances), start the migrations the rescheduler asks for, and advance each one by a phase."""
        for index, fut in list(self._state_polls.items()):
            if not self.instances.wait([fut], 0):
                continue
            del self._state_polls[index]
            try:
                self.view.update(self.instances.result(index, fut))
            except Exception as e:
                logger.error("instance %d failed: %s", index, e)
                self._instance_died(index)
        now = self.now()
        if now - self._last_poll >= STATE_PERIOD_S and not self._state_polls:
            self._last_poll = now
            for index in self._alive_indices():
                self._state_polls[index] = self.instances.submit(index, "instance_state")
                self._tell(index, "migration", "watchdog", WATCHDOG_S)
            if self.rescheduler is not None:
                for order in self.rescheduler.plan(self.view):
                    if order.request_id in self.live and self.owner.get(order.request_id) == order.src:
                        self._start_migration(order.request_id, order.src, order.dst, order.num_blocks)
        self._collect_migrations()

    def migrate(self, request_id: str, dst: int, num_blocks: int | None = None) -> Migration:
        """Start moving a running request to instance `dst` now (on a migration thread; `step` settles
        it). `num_blocks`: what the destination pre-allocates (default: the request's blocks now)."""
        req = self.live.get(request_id)
        src = self.owner.get(request_id)
        if req is None or src is None:
            raise ValueError(f"no running request {request_id!r}")
        if not 0 <= dst < len(self.alive):
            raise ValueError(f"no instance {dst}: the instances are 0 to {len(self.alive) - 1}")
        if not self.alive[dst]:
            raise ValueError(f"instance {dst} is not alive")
        if dst == src:
            raise ValueError(f"request {request_id!r} already runs on instance {dst}")
        if request_id in self.migrations:
            raise ValueError(f"request {request_id!r} is already migrating")
        blocks = cdiv(req.num_tokens, self.block_size) if num_blocks is None else num_blocks
        return self._start_migration(request_id, src, dst, blocks)

    def _start_migration(self, request_id: str, src: int, dst: int, num_blocks: int) -> Migration:
        m = Migration(request_id, src, dst, num_blocks)
        self.migrations[request_id] = m
        self.view.migrations[request_id] = (src, dst)
        self._migration_runs[request_id] = self._migration_pool.submit(self._run_migration, m)
        return m

    def _run_migration(self, m: Migration) -> Any:
        """On a migration thread: drive the state machine to its end (each phase waits for the instances'
        step boundaries, so the front end's thread must not). Returns the source's stop snapshot."""
        src, dst = RemoteEndpoint(self.instances, m.src), RemoteEndpoint(self.instances, m.dst)
        while not m.finished:
            m.advance(src, dst, self.now)  # a clock: the downtime is read after the commit call
        return src.stopped

    def _collect_migrations(self) -> None:
        """On the engine thread: settle the migrations whose thread has finished."""
        for rid, fut in list(self._migration_runs.items()):
            if not fut.done():
                continue
            del self._migration_runs[rid]
            m = self.migrations.get(rid)
            if m is None:  # already ended (an instance died)
                continue
            try:
                snap = fut.result()
            except InstanceDiedError as e:
                self._instance_died(e.index)  # ends the migration, re-dispatches the dead one's requests
                continue
            except Exception as e:  # a call the state machine does not guard failed: give this one up
                logger.error("migration of %s failed: %s", rid, e)
                self._end_migration(m, f"failed: {e}")
                continue
            if snap is not None:  # the request's outputs as the source stopped it (fills a gap)
                times = [t - self.clock.unix_offset() for t in snap.times.tokens]
                self._fill[rid] = TokenRecord(rid, 0, list(snap.output_token_ids), times)
            self._end_migration(m, m.reason)

    def _end_migration(self, m: Migration, reason: str) -> None:
        """A migration is over: committed (the destination owns the request now) or not (the source
        keeps it; if the source is dead, the request is re-dispatched as any of its requests)."""
        self.migrations.pop(m.request_id, None)
        self.view.migrations.pop(m.request_id, None)
        if not m.finished:  # cut short by a dead instance: free what the living side holds
            m.reason = reason
            if self.alive[m.dst]:
                self._tell(m.dst, "abort", [m.request_id])
            if self.alive[m.src] and m.stopped_at is not None:
                self._tell(m.src, "migration", "finish_out", m.request_id, False)
        if m.committed and m.request_id in self.live:
            self.owner[m.request_id] = m.dst
        else:
            self._fill.pop(m.request_id, None)
        self.done_migrations.append(m)

    def migration_stats(self) -> dict[str, Any]:
        done = self.done_migrations
        downtimes = sorted(m.downtime for m in done if m.committed and m.downtime is not None)
        return {
            "migrations": sum(m.committed for m in done),
            "migrations_aborted": sum(not m.committed for m in done),
            "migrations_in_flight": len(self.migrations),
            "migration_downtime_ms_mean": 1e3 * sum(downtimes) / len(downtimes) if downtimes else None,
            "migration_downtime_ms_max": 1e3 * downtimes[-1] if downtimes else None,
        }

    # ---- outputs ------------------------------------------------------------------------------------------
    def _apply(
        self, records: list[tuple[int, TokenRecord]], only_finished: bool, outputs: list[RequestOutput]
    ) -> list[str]:
        """Fold the instances' records into the mirror, one token per request at a time (the output
        processor's unit), and collect the outputs. Returns the requests an instance lost."""
        failed, self._lost = self._lost, []
        now = self.now()
        records = self._with_held(records, now)
        depth = max((max(len(r.token_ids), len(r.prompt_logprobs), 1) for _, r in records), default=0)
        for j in range(depth):
            updated: list[Request] = []
            result = StepResult({}, 0.0)
            for index, rec in records:
                req = self.live.get(rec.request_id)
                if req is None:
                    continue
                # The destination of a migration reports a request only once it has committed it (its
                # thread may not have told this one yet).
                m = self.migrations.get(rec.request_id)
                owns = self.owner.get(rec.request_id) == index or (m is not None and m.dst == index)
                if j < len(rec.prompt_logprobs) and owns:
                    result.prompt_logprobs[rec.request_id] = rec.prompt_logprobs[j]
                if j < len(rec.token_ids) and rec.start + j > req.num_output_tokens:
                    # Ahead of tokens not yet here (a migration's source has still to report them):
                    # the rest of this record, and the state after it, waits for them.
                    self._held.append((index, _tail(rec, j)))
                    self._gap_since.setdefault(rec.request_id, now)
                    rec.token_ids, rec.status, rec.error = rec.token_ids[:j], RequestStatus.RUNNING, None
                    continue
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
                    self._fill.pop(req.request_id, None)
                    self.router.forget(req.request_id)
        return failed

    def _with_held(self, records: list[tuple[int, TokenRecord]], now: float) -> list[tuple[int, TokenRecord]]:
        """Records held back for a gap go first. A gap open too long is filled from the outputs the
        migration's source had when it stopped (without logprobs: only the source had those)."""
        if not self._held:
            self._gap_since.clear()
            return records
        held, self._held = self._held, []
        out: list[tuple[int, TokenRecord]] = []
        for index, rec in held:
            since = self._gap_since.get(rec.request_id, now)
            fill = self._fill.get(rec.request_id)
            if fill is not None and now - since > GAP_WAIT_S:
                out.append((index, fill))
            out.append((index, rec))
        self._gap_since = {
            r.request_id: self._gap_since[r.request_id] for _, r in held if r.request_id in self._gap_since
        }
        return out + records


_EMPTY_PLAN = StepPlan(step_id=-1)


def _tail(rec: TokenRecord, j: int) -> TokenRecord:
    """The record from its j-th token on."""
    return TokenRecord(
        rec.request_id,
        rec.start + j,
        rec.token_ids[j:],
        rec.times[j:],
        None if rec.logprobs is None else rec.logprobs[j:],
        [],
        rec.status,
        rec.stop_reason,
        rec.finished_time,
        rec.first_scheduled,
        rec.num_cached_tokens,
        rec.num_preemptions,
        rec.error,
    )  # the observers read only the updated requests


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
