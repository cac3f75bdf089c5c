"""InstanceWorker: one engine instance of a cluster, stepping on its own thread.

A Ray actor wraps it (`ray_instances.py`); tests use it in-process. It holds an EngineCore (the real model
and a wall clock) and nothing of text: the cluster's front end tokenizes, detokenizes and finds stop
strings. Every call that touches the engine runs on the step thread between two steps (the engine is not
thread-safe), so a caller blocks for at most one step. Outputs are not pushed: the front end long-polls
`poll`, which returns the tokens of every step since the last poll at once, so an instance makes no
remote call per step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from quanta.cluster.endpoint import MigrationEndpoint
from quanta.cluster.state import InstanceState
from quanta.cluster.transport import InProcessTransport, KVTransport
from quanta.engine.clock import WallClock
from quanta.engine.core import StepFailedError, StepOutput
from quanta.executor.base import TokenLogprobs
from quanta.request import Request, RequestStatus

logger = logging.getLogger("quanta.cluster")

T = TypeVar("T")

MIGRATION_CALLS = frozenset(
    {"reserve", "stage_out", "stage_in", "abort_in", "finish_out", "watchdog", "abort"}
)


@dataclass(slots=True)
class TokenRecord:
    """What one request did on an instance since the last poll: tokens from index `start` of its outputs,
    and its state after them."""

    request_id: str
    start: int
    token_ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[tuple[int, list[TokenLogprobs]]] = field(default_factory=list)
    status: int = RequestStatus.RUNNING
    stop_reason: int | str | None = None
    finished_time: float | None = None
    first_scheduled: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    error: str | None = None  # the step running it failed: the request is lost (aborted here)


def cluster_clock(epoch: float) -> WallClock:
    """A wall clock reading 0 at wall time `epoch` (time.time()), so that every instance and the front
    end share one time line (their own monotonic origins differ)."""
    return WallClock(origin=time.monotonic() - (time.time() - epoch))


class InstanceWorker:
    def __init__(
        self,
        engine_args: Any,
        index: int,
        epoch: float,
        num_threads: int | None = None,
        transport: KVTransport | None = None,
    ) -> None:
        from quanta.engine.llm_engine import LLMEngine

        if num_threads is not None and engine_args.device == "cpu":
            import torch

            torch.set_num_threads(num_threads)
        self.index = index
        self.engine = LLMEngine(engine_args, clock=cluster_clock(epoch))
        self.core = self.engine.core
        # The instance's side of live migrations; its calls run on the step thread like every other.
        self.endpoint = MigrationEndpoint(self.core, transport or InProcessTransport(), index)
        self._cond = threading.Condition()
        self._inbox: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._records: dict[str, TokenRecord] = {}  # since the last poll, in order of first token
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"quanta-instance-{index}", daemon=True)
        self._thread.start()

    # ---- called from other threads (Ray's) ------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        e = self.engine
        return {
            "index": self.index,
            "max_model_len": e.max_model_len,
            "num_blocks": self.core.kv.num_blocks,
            "block_size": self.core.kv.block_size,
        }

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the step thread between two steps; its result or exception comes back here."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._error is not None:
                raise RuntimeError(f"instance {self.index} stopped: {self._error!r}")
            if self._stopping:
                raise RuntimeError(f"instance {self.index} is shutting down")
            self._inbox.append((fn, fut))
            self._cond.notify_all()
        return fut.result()

    def add(self, requests: list[Request]) -> None:
        """Admit requests (new, or carrying outputs to recompute after their instance died). All or none:
        a ValueError leaves none of them here."""

        def add() -> None:
            added: list[str] = []
            try:
                for req in requests:
                    self.core.add_request(req)
                    added.append(req.request_id)
            except ValueError:
                self.core.abort_requests(added)
                raise

        self.call(add)

    def abort(self, request_ids: list[str]) -> None:
        """Client aborts: the requests here, or their reservations if they are migrating in."""
        self.call(lambda: self.endpoint.abort(request_ids))

    def finish(self, request_ids: list[str], status: int) -> None:
        """End requests for a reason the front end found (a stop string)."""

        def finish() -> None:
            for rid in request_ids:
                self.core.finish_request(rid, RequestStatus(status))

        self.call(finish)

    def poll(self, timeout: float) -> list[TokenRecord]:
        """What happened since the last poll, waiting up to `timeout` seconds for something to happen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._records and self._error is None and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._error is not None and not self._records:
                raise RuntimeError(f"instance {self.index} stopped: {self._error!r}")
            records = list(self._records.values())
            self._records.clear()
        return records

    def kv_state(self, check: bool = False) -> dict[str, Any]:
        """Counts, KV occupancy and (with `check`) the KV integrity check, for /internal/state."""

        def state() -> dict[str, Any]:
            # The single engine's own report (one place for counts and the integrity check).
            st = self.engine.state(check)
            c = self.engine.counters()
            return {
                "index": self.index,
                **{
                    f.name: getattr(st, f.name)
                    for f in dataclasses.fields(st)
                    if f.name not in ("instances", "cluster")
                },
                "prefix_queries": c.prefix_queries,
                "prefix_hits": c.prefix_hits,
                "preemptions": c.preemptions,
            }

        return self.call(state)

    def instance_state(self) -> InstanceState:
        """The snapshot the cluster's router and rescheduler read (prefix hashes: since the last call)."""
        return self.call(self.endpoint.state)

    def migration(self, method: str, *args: Any) -> Any:
        """One MigrationEndpoint call (reserve, stage_out, stage_in, abort_in, finish_out, watchdog)."""
        if method not in MIGRATION_CALLS:
            raise ValueError(f"unknown migration call {method!r}")
        return self.call(lambda: getattr(self.endpoint, method)(*args))

    def reset_prefix_cache(self) -> bool:
        return self.call(self.core.kv.reset_prefix_cache)

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ---- the step thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._loop()
        except BaseException as e:
            logger.exception("instance %d died", self.index)
            error = e
        # Whatever was still waiting for the step thread fails now rather than never.
        with self._cond:
            self._error = error
            self._stopping = True
            pending, self._inbox = self._inbox, []
            self._cond.notify_all()
        for _, fut in pending:
            fut.set_exception(
                RuntimeError(f"instance {self.index} stopped" + (f": {error!r}" if error else ""))
            )

    def _loop(self) -> None:
        core = self.core
        while True:
            with self._cond:
                while not self._inbox and not self._stopping and not core.has_unfinished():
                    wait = core.idle_wait()  # until a KV pin runs out, which nothing else releases
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopping:
                    return
                commands, self._inbox = self._inbox, []
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
            if not core.has_unfinished():
                core.on_idle()
                continue
            try:
                out = core.step()
            except StepFailedError as e:
                logger.error(
                    "instance %d: step failed (%d requests lost): %s", self.index, len(e.request_ids), e
                )
                self._record_failed(e.request_ids, str(e))
                continue
            self._record(out)

    def _record(self, out: StepOutput) -> None:
        result = out.result
        with self._cond:
            for req in out.updated:
                rec = self._records.get(req.request_id)
                if rec is None:
                    rec = self._records[req.request_id] = TokenRecord(
                        req.request_id, req.num_output_tokens - 1
                    )
                rec.token_ids.append(req.output_token_ids[-1])
                rec.times.append(req.times.tokens[-1])
                lp = result.logprobs.get(req.request_id)
                if lp is not None:
                    if rec.logprobs is None:
                        rec.logprobs = []
                    rec.logprobs.append(lp)
                _copy_state(req, rec)
            for rid, entry in result.prompt_logprobs.items():
                rec = self._records.get(rid)
                if rec is None:
                    req = self.core.scheduler.requests.get(rid)
                    if req is None:
                        continue
                    rec = self._records[rid] = TokenRecord(rid, req.num_output_tokens)
                rec.prompt_logprobs.append(entry)
            if self._records:
                self._cond.notify_all()

    def _record_failed(self, request_ids: list[str], message: str) -> None:
        with self._cond:
            for rid in request_ids:
                rec = self._records.setdefault(rid, TokenRecord(rid, 0))
                rec.status = RequestStatus.FINISHED_ABORTED
                rec.error = message
            self._cond.notify_all()


def _copy_state(req: Request, rec: TokenRecord) -> None:
    rec.status = req.status
    rec.stop_reason = req.stop_reason
    rec.finished_time = req.times.finished
    rec.first_scheduled = req.times.first_scheduled
    rec.num_cached_tokens = req.num_cached_tokens
    rec.num_preemptions = req.num_preemptions
