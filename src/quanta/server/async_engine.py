"""AsyncEngine: one thread owns the LLMEngine; asyncio code adds, streams and aborts requests.

The engine is not thread-safe, so every call into it happens on its thread: commands (add, abort, state)
go into an inbox that the thread drains at the top of each step, and each request's outputs come back to
its asyncio.Queue through `loop.call_soon_threadsafe`. The thread sleeps on a Condition while it has
nothing to do (no busy loop).

Failures: a step the executor could not run ends only that step's requests (their streams get a
RequestFailedError); the engine goes on serving the rest. Any other exception on the engine thread kills
it: every open stream and waiting command then fails at once with EngineDeadError, later calls raise it
immediately, and `alive` turns False (the server's /health answers 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quanta.engine.core import StepFailedError
from quanta.engine.llm_engine import EngineFrontend, EngineState, PromptType
from quanta.engine.output import RequestOutput
from quanta.request import Request, RequestStatus
from quanta.sampling_params import SamplingParams

logger = logging.getLogger("quanta.server")


class QueueFullError(Exception):
    """The waiting queue is over its configured limit; the client should retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or died of an unexpected error); nothing more can run."""


class RequestFailedError(RuntimeError):
    """The engine step running this request failed; the request was aborted (the engine serves on)."""


@dataclass(slots=True)
class QueueLimits:
    max_waiting_requests: int | None = None  # waiting (not yet running) requests, n>1 samples counted each
    max_waiting_tokens: int | None = None  # prompt tokens of those requests


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    requests: list[Request] = field(default_factory=list)  # the engine's requests (n>1: one per sample)


class RequestStream:
    """Async iterator over one request's outputs. Leaving early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self._engine = engine
        self.request_id = request_id
        self._queue = queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the consumer is gone
            self.close()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:  # a stream nobody read to the end (e.g. a response never started)
        self.close()


class AsyncEngine:
    def __init__(
        self,
        engine: EngineFrontend,
        limits: QueueLimits | None = None,
        on_step: Callable[[EngineFrontend, list[RequestOutput]], None] | None = None,
        on_abort: Callable[[list[Request], str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits or QueueLimits()
        # Called on the engine thread after every step with its outputs, and with the requests an abort
        # ("abort": the client left) or a failed step ("error") ended.
        self.on_step = on_step
        self.on_abort = on_abort
        self._inbox: deque[tuple[str, Any, concurrent.futures.Future | None]] = deque()
        self._cond = threading.Condition()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stopping = False
        self._death: EngineDeadError | None = None  # set once, when the thread ends (under _cond)
        self._thread = threading.Thread(target=self._run, name="quanta-engine", daemon=True)
        self._thread.start()

    # ---- asyncio side ---------------------------------------------------------------------------
    def _send(self, kind: str, payload: Any, want_result: bool = True) -> concurrent.futures.Future | None:
        fut: concurrent.futures.Future | None = concurrent.futures.Future() if want_result else None
        with self._cond:
            if self._death is not None:
                raise EngineDeadError(str(self._death))
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            self._inbox.append((kind, payload, fut))
            self._cond.notify()
        return fut

    def now(self) -> float:
        """The engine's clock (thread-safe: a monotonic wall clock)."""
        return self.engine.now()

    async def add(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        **kwargs: Any,
    ) -> RequestStream:
        """Add a request; returns the stream of its outputs.

        Errors in the request (ValueError) and a full queue (QueueFullError) raise here. A stream closed,
        cancelled or dropped before its end (client disconnect) aborts the request and frees its blocks.
        """
        (stream,) = await self.add_many([(request_id, prompt, params)], **kwargs)
        return stream

    async def add_many(
        self, items: list[tuple[str, PromptType, SamplingParams]], **kwargs: Any
    ) -> list[RequestStream]:
        """Add several requests (the prompts of one API call) with one command, so the engine thread adds
        them all before its next step: they enter the scheduler together rather than one step apart.
        All or nothing: if one is refused, the ones already added are aborted and the error raises here."""
        loop = asyncio.get_running_loop()
        kwargs.setdefault("arrival_time", self.now())
        batch = [
            (rid, prompt, params, kwargs, _Stream(loop, asyncio.Queue())) for rid, prompt, params in items
        ]
        fut = self._send("add_many", batch)
        assert fut is not None
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the client left while the engine was adding the requests
            for rid, *_ in batch:
                self.abort(rid)
            raise
        return [RequestStream(self, rid, stream.queue) for rid, _, _, _, stream in batch]

    def abort(self, request_id: str) -> None:
        with self._cond:
            if self._stopping or self._death is not None:
                return
            self._inbox.append(("abort", request_id, None))
            self._cond.notify()

    async def state(self, check: bool = True) -> EngineState:
        """Counts and KV occupancy; `check` also runs the KV integrity check (O(blocks))."""
        fut = self._send("state", check)
        assert fut is not None
        return await asyncio.wrap_future(fut)

    async def call(self, fn: Callable[[EngineFrontend], Any]) -> Any:
        """Run fn(engine) on the engine thread between two steps (e.g. start a migration)."""
        fut = self._send("call", fn)
        assert fut is not None
        return await asyncio.wrap_future(fut)

    @property
    def alive(self) -> bool:
        alive = self._thread.is_alive() and not self._stopping and self._death is None
        return alive and self.engine.healthy()

    @property
    def death(self) -> EngineDeadError | None:
        """Why the engine thread ended, once it has."""
        return self._death

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug or a broken engine: record it so that nothing waits forever
            logger.exception("the engine thread died")
            self._die(EngineDeadError(f"the engine stopped after an internal error: {e!r}"))
        else:
            self._die(EngineDeadError("the engine is shutting down"))

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not self._stopping and not engine.has_unfinished_requests():
                    wait = engine.idle_wait()  # e.g. until a KV pin runs out, which nothing else releases
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopping:
                    return
                commands = list(self._inbox)
                self._inbox.clear()
            for kind, payload, fut in commands:
                self._handle(kind, payload, fut)
            if not engine.has_unfinished_requests():
                engine.on_idle()
                continue
            try:
                outputs = engine.step()
            except StepFailedError as e:  # only this step's requests are lost; serve the rest
                logger.error("engine step failed (%d requests aborted): %s", len(e.request_ids), e.__cause__)
                self._fail_requests(e.request_ids, str(e))
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                if stream is not None:
                    self._deliver(stream, out)
            if self.on_step is not None:
                try:
                    self.on_step(engine, outputs)
                except Exception:  # metrics must never stop the engine
                    logger.exception("step observer failed")

    @staticmethod
    def _deliver(stream: _Stream, item: RequestOutput | BaseException) -> None:
        # RuntimeError: its event loop is closed (shutdown), nobody to tell.
        with contextlib.suppress(RuntimeError):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_requests(self, request_ids: list[str], message: str) -> None:
        """End these requests' streams with RequestFailedError (the engine has already dropped them)."""
        failed: list[Request] = []
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._deliver(stream, RequestFailedError(message))
                failed.extend(stream.requests)
        if failed and self.on_abort is not None:
            try:
                self.on_abort(failed, "error")
            except Exception:
                logger.exception("abort observer failed")

    def _handle(self, kind: str, payload: Any, fut: concurrent.futures.Future | None) -> None:
        try:
            if kind == "add_many":
                self._check_queue(payload)  # the call as a whole: all of its prompts or none
                added: list[str] = []
                try:
                    for item in payload:
                        self._add(*item)
                        added.append(item[0])
                except Exception:
                    for request_id in added:
                        self._streams.pop(request_id, None)
                    self.engine.abort_request(added)
                    raise
                result: Any = None
            elif kind == "abort":
                gone = self._streams.pop(payload, None)
                self.engine.abort_request(payload)
                if gone is not None and self.on_abort is not None:
                    try:
                        self.on_abort(
                            [r for r in gone.requests if r.status == RequestStatus.FINISHED_ABORTED], "abort"
                        )
                    except Exception:
                        logger.exception("abort observer failed")
                result = None
            elif kind == "state":
                result = self.engine.state(payload)
            elif kind == "call":
                result = payload(self.engine)
            else:
                raise AssertionError(kind)
        except Exception as e:
            if fut is not None:
                fut.set_exception(e)
            else:
                logger.exception("engine command %s failed", kind)
            return
        if fut is not None:
            fut.set_result(result)

    def _add(
        self, request_id: str, prompt: PromptType, params: SamplingParams, kwargs: dict, stream: _Stream
    ) -> None:
        self.engine.add_request(request_id, prompt, params, **kwargs)
        stream.requests = self.engine.requests_of(request_id)
        self._streams[request_id] = stream

    def _check_queue(self, items: list) -> None:
        """Refuse a call whose prompts would take the waiting queue past its limits: QueueFullError (retry
        later) when the queue holds too much now, ValueError when the call alone is over a limit (it would
        never fit: a retry cannot help)."""
        lim = self.limits
        if lim.max_waiting_requests is None and lim.max_waiting_tokens is None:
            return
        num_new = new_tokens = 0
        for _, prompt, params, _, _ in items:
            ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else prompt
            num_new += params.n
            new_tokens += (len(ids) if isinstance(ids, list) else 0) * params.n
        num_waiting, tokens = self.engine.waiting_load()
        for limit, new, held, unit in (
            (lim.max_waiting_requests, num_new, num_waiting, "requests"),  # n > 1: each sample counts
            (lim.max_waiting_tokens, new_tokens, tokens, "prompt tokens"),  # times n
        ):
            if limit is None:
                continue
            if new > limit:
                raise ValueError(
                    f"this request brings {new} {unit} (n counted), more than the server's waiting queue "
                    f"takes ({limit})"
                )
            if held + new > limit:
                raise QueueFullError(f"the waiting queue holds {held} {unit} (limit {limit})")

    def _die(self, error: EngineDeadError) -> None:
        """The thread is ending: refuse new commands, and fail every open stream and waiting command."""
        with self._cond:
            self._death = error
            pending = list(self._inbox)
            self._inbox.clear()
        streams, self._streams = self._streams, {}
        # A fresh exception for each waiter: one instance raised in many tasks would pile up tracebacks.
        for stream in streams.values():
            self._deliver(stream, EngineDeadError(str(error)))
        for _, _, fut in pending:
            if fut is not None and not fut.done():
                fut.set_exception(EngineDeadError(str(error)))
        if streams:
            try:  # free their KV if the engine still can (not if it died of a broken state)
                self.engine.abort_request(list(streams))
            except Exception:
                logger.exception("could not abort the requests of a stopped engine")
