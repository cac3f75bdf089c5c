"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, tokenize, health, metrics.

Request handlers read the body (within `max_request_bytes`), validate it, and tokenize it off the event
loop; the AsyncEngine's thread does everything else. A request whose client goes away is aborted at once
(its stream is closed, which sends an abort to the engine thread).

Errors are always OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for bad input
(including fields that would change the output in ways this server does not implement), 401 for a missing
or wrong API key, 403 for a tenant the key may not act for, 404, 413 for an oversized body, 415 for a body
not sent as application/json, 429 for a full queue, 500 when the engine step running a request failed (the
engine serves on), 503 once the engine has stopped. Streams that have started report errors in-band (an
error event, then `data: [DONE]`), as vLLM does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import quanta
from quanta.cluster.router import NoInstanceError
from quanta.engine.llm_engine import EngineFrontend
from quanta.engine.output import CompletionOutput, Logprob, RequestOutput
from quanta.sampling_params import SamplingParams
from quanta.server import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TENANT_LABELS, DEFAULT_PRIORITY_RANGE
from quanta.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    QueueLimits,
    RequestFailedError,
    RequestStream,
)
from quanta.server.auth import KeyPolicy, KeyTable
from quanta.server.batches import BatchManager, BatchStore, parse_upload
from quanta.server.metrics import ServerMetrics
from quanta.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    _Common,
    error_body,
)

logger = logging.getLogger("quanta.server")

# Paths that need the API key (when one is set). /health, /version and /metrics stay open, as in vLLM.
_PROTECTED = ("/v1", "/internal", "/tokenize", "/detokenize")
# Texts shorter than this are tokenized on the event loop: the hop to a worker thread would cost more.
_INLINE_TOKENIZE_CHARS = 4096
# Bodies larger than this are parsed off the event loop.
_INLINE_PARSE_BYTES = 1 << 20
# chat_template_kwargs never set these (vLLM's resolve_chat_template_kwargs leaves them out too).
_NOT_KWARGS = frozenset({"chat_template", "tokenize"})


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, headers=None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = (
            status,
            message,
            type_,
            param,
            headers,
        )


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def _bad_params(e: ValueError) -> APIError:
    """A request's sampling settings refused (SamplingParams' messages begin with the field's name, as in
    "min_tokens (5) must not exceed max_tokens (2)"): a 400 whose param names that field."""
    message = str(e)
    word = re.match(r"[a-z_]+", message)
    fields = CompletionRequest.model_fields.keys() | ChatCompletionRequest.model_fields.keys()
    return _bad(message, word[0] if word and word[0] in fields else None)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.status, e.param), e.status, headers=e.headers)


def _api_error_of(e: BaseException) -> APIError:
    """The API error a request that ended with `e` reports."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e), "server_error")
    if isinstance(e, (EngineDeadError, NoInstanceError)):
        return APIError(503, str(e), "server_error")
    return APIError(500, "internal server error", "server_error")  # details go to the log, not the client


def _without_completion(out: RequestOutput) -> RequestOutput:
    """A prompt-scoring request's output (echo with max_tokens=0): the engine samples one token, since it
    computes prompt logprobs in a prefill; the client asked for none, so drop it, as vLLM returns none."""
    outputs = [
        dataclasses.replace(
            o,
            text="",
            token_ids=[],
            cumulative_logprob=None,
            logprobs=[] if o.logprobs is not None else None,
            finish_reason="length" if o.finish_reason is not None else None,
            stop_reason=None,
        )
        for o in out.outputs
    ]
    return dataclasses.replace(out, outputs=outputs)


def _is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";")[0].strip().lower() == "application/json"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _sse_error(e: BaseException) -> str:
    """An in-band error event: the status line of a stream is sent already, so report it like vLLM does."""
    if not isinstance(e, (APIError, RequestFailedError, EngineDeadError)):
        logger.error("stream failed", exc_info=e)
    err = _api_error_of(e)
    return _sse(error_body(err.message, err.type, err.status, err.param))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only disconnect messages remain)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; cancel it (aborting its requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()


class OpenAIServer:
    """The app and what it needs. Options (all keyword arguments of `build_app` and `run_server` too):

    api_key: one bearer key that may do anything. api_keys: a table of keys (see `auth.load_api_keys`),
    each optionally bound to a tenant and a priority range. With either, /v1/*, /tokenize, /detokenize and
    /internal/* need a key. limits / retry_after_s: the waiting-queue limits, beyond which requests get 429.
    max_request_bytes: the largest request body (413 beyond it). max_tenant_labels: distinct tenant label
    values in /metrics (later tenants share one label). priority_range: the priorities a request may ask for.
    cors_origins: origins browsers may call this API from (CORS headers); none by default.
    trust_request_chat_template: render chat requests with the Jinja `chat_template` they carry (vLLM's
    --trust-request-chat-template); off by default, when such requests get a 400, as in vLLM.
    """

    def __init__(
        self,
        engine: EngineFrontend,
        served_model_name: str,
        api_key: str | None = None,
        limits: QueueLimits | None = None,
        retry_after_s: int = 1,
        enable_internal: bool = True,
        *,
        api_keys: dict[str, KeyPolicy] | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_tenant_labels: int = DEFAULT_MAX_TENANT_LABELS,
        priority_range: tuple[int, int] = DEFAULT_PRIORITY_RANGE,
        cors_origins: list[str] | None = None,
        batch_dir: str | Path | None = None,
        batch_max_in_flight: int = 64,
        trust_request_chat_template: bool = False,
    ) -> None:
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
        if priority_range[0] > priority_range[1]:
            raise ValueError(f"priority_range {priority_range} is empty")
        self.llm_engine = engine
        self.model_name = served_model_name
        self.keys = KeyTable(api_key, api_keys)
        self.retry_after_s = retry_after_s
        self.max_request_bytes = max_request_bytes
        self.priority_range = priority_range
        self.metrics = ServerMetrics(served_model_name, engine.block_size, max_tenant_labels)
        self.metrics.attach(engine)
        self.engine = AsyncEngine(
            engine, limits, on_step=self.metrics.observe_outputs, on_abort=self.metrics.observe_aborted
        )
        self.created = int(time.time())
        self.cors_origins = list(cors_origins or [])
        self.trust_request_chat_template = trust_request_chat_template
        # Files and Batches APIs (on disk under batch_dir); batch requests get the least important priority.
        self.batches: BatchManager | None = None
        if batch_dir is not None:
            if batch_max_in_flight < 1:
                raise ValueError(f"batch_max_in_flight must be positive, got {batch_max_in_flight}")
            store = BatchStore(batch_dir)
            self.batches = BatchManager(
                store, self.engine, engine, served_model_name, priority_range[1], batch_max_in_flight
            )
        self.app = self._build(enable_internal)

    # ---- app --------------------------------------------------------------------------------------
    def _build(self, enable_internal: bool) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            if self.batches is not None:
                self.batches.resume()  # batches accepted before a restart go on
            yield
            if self.batches is not None:
                await self.batches.shutdown()
            self.engine.shutdown()

        # /openapi.json is FastAPI's own schema (as vLLM serves it); the docs pages load scripts from a
        # CDN, so they stay off.
        app = FastAPI(
            title="quanta", version=quanta.__version__, docs_url=None, redoc_url=None, lifespan=lifespan
        )
        self._add_auth(app)
        if self.cors_origins:
            # Added after the auth middleware, so it wraps it: preflights (which carry no key) get their
            # answer here.
            app.add_middleware(
                CORSMiddleware,
                allow_origins=self.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
            )
        self._add_error_handlers(app)

        @app.get("/health")
        async def health() -> Response:
            if self.engine.alive:
                return Response(status_code=200)
            return _error_response(APIError(503, "the engine is not running", "server_error"))

        @app.head("/health")  # load balancers' probes (a route of its own: the schema's operation ids differ)
        async def health_head() -> Response:
            return await health()

        # vLLM's (SageMaker's) health check; two routes, so that the schema's operation ids differ.
        @app.get("/ping")
        async def ping() -> Response:
            return await health()

        @app.post("/ping")
        async def ping_post() -> Response:
            return await health()

        @app.get("/version")
        async def version() -> dict:
            return {"version": quanta.__version__}

        @app.get("/metrics")
        async def metrics() -> Response:
            state = await self.engine.state(check=False)
            self.metrics.set_gauges(state)
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        if enable_internal:

            @app.get("/internal/state")
            async def internal_state() -> dict:
                return asdict(await self.engine.state(check=True))

            @app.post("/internal/migrate")
            async def internal_migrate(request: Request) -> dict:
                return await self._migrate(request)

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str) -> dict:
            if model_id != self.model_name:
                raise APIError(404, f"the model {model_id!r} does not exist", "NotFoundError", "model")
            return self._model_card()

        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict:
            return await self._tokenize(request)

        @app.post("/detokenize")
        async def detokenize(request: Request) -> dict:
            return await self._detokenize(request)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await self._parse(request, CompletionRequest)
            return _echo_request_id(request, await self._completions(request, body))

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await self._parse(request, ChatCompletionRequest)
            return _echo_request_id(request, await self._chat(request, body))

        if self.batches is not None:
            self._add_batch_routes(app, self.batches)
        return app

    def _add_batch_routes(self, app: FastAPI, batches: BatchManager) -> None:
        store = batches.store

        def missing(kind: str, id_: str) -> APIError:
            return APIError(404, f"no {kind} {id_!r}", "NotFoundError")

        @app.post("/v1/files")
        async def upload(request: Request) -> dict:
            # A browser can post a form cross-origin without a preflight, but not with this header.
            if "authorization" not in request.headers:
                raise APIError(401, "uploads need an Authorization header", "authentication_error")
            raw = await self._read_body(request)
            try:
                filename, content, purpose = parse_upload(request.headers.get("content-type"), raw)
            except ValueError as e:
                raise _bad(str(e), "file") from None
            return store.add_file(content, filename, purpose)

        @app.get("/v1/files")
        async def files() -> dict:
            return {"object": "list", "data": store.list_files(), "has_more": False}

        @app.get("/v1/files/{file_id}")
        async def file(file_id: str) -> dict:
            obj = store.get_file(file_id)
            if obj is None:
                raise missing("file", file_id)
            return obj

        @app.get("/v1/files/{file_id}/content")
        async def file_content(file_id: str) -> Response:
            if store.get_file(file_id) is None:
                raise missing("file", file_id)
            data = await asyncio.to_thread(store.content_path(file_id).read_bytes)
            return Response(data, media_type="application/jsonl")

        @app.delete("/v1/files/{file_id}")
        async def delete_file(file_id: str) -> dict:
            if not store.delete_file(file_id):
                raise missing("file", file_id)
            return {"id": file_id, "object": "file", "deleted": True}

        @app.post("/v1/batches")
        async def create_batch(request: Request) -> dict:
            data = await self._read_json(request)
            try:
                return batches.create(
                    str(data.get("input_file_id")),
                    str(data.get("endpoint")),
                    str(data.get("completion_window", "24h")),
                    data.get("metadata"),
                )
            except ValueError as e:
                raise _bad(str(e)) from None

        @app.get("/v1/batches")
        async def list_batches(limit: int = 20, after: str | None = None) -> dict:
            if not 1 <= limit <= 100:
                raise _bad("limit must be between 1 and 100", "limit")
            return batches.page(limit, after)

        @app.get("/v1/batches/{batch_id}")
        async def get_batch(batch_id: str) -> dict:
            obj = batches.get(batch_id)
            if obj is None:
                raise missing("batch", batch_id)
            return obj

        @app.post("/v1/batches/{batch_id}/cancel")
        async def cancel_batch(batch_id: str) -> dict:
            obj = batches.cancel(batch_id)
            if obj is None:
                raise missing("batch", batch_id)
            return obj

    def _add_auth(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def auth(request: Request, call_next):  # type: ignore[no-untyped-def]
            policy: KeyPolicy | None = None
            if self.keys.enabled and request.url.path.startswith(_PROTECTED):
                policy = self.keys.check(request.headers.get("authorization"))
                if policy is None:
                    return _error_response(
                        APIError(401, "invalid or missing API key", "authentication_error")
                    )
            request.state.key_policy = policy
            return await call_next(request)

    @staticmethod
    def _add_error_handlers(app: FastAPI) -> None:
        @app.exception_handler(APIError)
        async def on_api_error(_: Request, e: APIError) -> JSONResponse:
            return _error_response(e)

        @app.exception_handler(RequestFailedError)
        @app.exception_handler(EngineDeadError)
        async def on_engine_error(_: Request, e: Exception) -> JSONResponse:
            return _error_response(_api_error_of(e))

        @app.exception_handler(RequestValidationError)
        async def on_bad_parameter(_: Request, e: RequestValidationError) -> JSONResponse:  # ?limit=abc
            err = e.errors()[0] if e.errors() else {}
            loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body")]
            param = loc[0] if loc else None
            return _error_response(_bad(f"{'.'.join(loc)}: {err.get('msg', 'invalid')}", param))

        @app.exception_handler(ClientDisconnect)
        async def on_client_gone(_: Request, e: ClientDisconnect) -> Response:
            return Response(status_code=499)  # the client left mid-body: nobody reads an answer

        @app.exception_handler(StarletteHTTPException)
        async def on_http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # 404/405 routes
            type_ = "NotFoundError" if e.status_code == 404 else "invalid_request_error"
            return _error_response(APIError(e.status_code, str(e.detail), type_, headers=e.headers))

        @app.exception_handler(Exception)
        async def on_unexpected(_: Request, e: Exception) -> JSONResponse:
            logger.error("request failed", exc_info=e)
            return _error_response(_api_error_of(e))

    async def _migrate(self, request: Request) -> dict:
        """Move a running request to another instance now (a cluster's live migration), and answer once
        the migration is over: {"request_id", "src", "dst", "committed", "reason", "downtime_ms"}."""
        migrate = getattr(self.llm_engine, "migrate", None)
        if migrate is None:
            raise APIError(
                400, "live migration needs a cluster (quanta serve --instances N)", "invalid_request_error"
            )
        try:
            body = json.loads(await self._read_body(request))
            request_id, dst = body["request_id"], body["dst"]
            if not isinstance(request_id, str) or not isinstance(dst, int) or isinstance(dst, bool):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise _bad(
                'the body must be {"request_id": "<id>", "dst": <instance index>}', "request_id"
            ) from None
        # The engine's id of a response's first prompt (and first sample, n > 1), or an engine id as is.
        live = getattr(self.llm_engine, "live", {})
        forms = (request_id, f"{request_id}-0", f"{request_id}-0#0", f"{request_id}#0")
        ids = [rid for rid in forms if rid in live]
        if not ids:  # a response named by its client (X-Request-Id): its engine ids carry a suffix
            named = re.compile(re.escape(request_id) + r"-[0-9a-f]{8}-0(#0)?")
            ids = sorted(rid for rid in live if named.fullmatch(rid))
        try:
            m = await self.engine.call(lambda e: migrate(ids[0] if ids else request_id, dst))
        except ValueError as e:
            raise APIError(
                404 if "no running request" in str(e) else 400, str(e), "invalid_request_error"
            ) from None
        deadline = time.monotonic() + 60
        # Read on the engine thread, which advances the migration: over once it has left the table.
        while await self.engine.call(lambda e: m in e.migrations.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return {
            "request_id": request_id,
            "src": m.src,
            "dst": m.dst,
            "committed": m.committed,
            "reason": m.reason or ("in flight" if not m.finished else ""),
            "stages": m.num_stages,
            "downtime_ms": None if m.downtime is None else 1e3 * m.downtime,
        }

    def _model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "quanta",
            "root": self.model_name,
            "max_model_len": self.llm_engine.max_model_len,
        }

    # ---- request bodies -------------------------------------------------------------------------
    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be over the limit: from Content-Length
        before reading anything, else (chunked) while reading."""
        limit = self.max_request_bytes
        too_large = APIError(
            413,
            f"the request body is larger than this server's limit of {limit} bytes",
            "invalid_request_error",
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise _bad("invalid Content-Length header")
            if int(declared) > limit:
                raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _read_json(self, request: Request) -> dict:
        # Browsers send text/plain (or form) bodies cross-origin without a CORS preflight; requiring JSON
        # keeps a web page from driving this API through a visitor's browser.
        if not _is_json(request.headers.get("content-type")):
            raise APIError(
                415,
                "the request body must be JSON, sent with Content-Type: application/json",
                "invalid_request_error",
            )
        raw = await self._read_body(request)
        try:
            data = (
                json.loads(raw)
                if len(raw) < _INLINE_PARSE_BYTES
                else await asyncio.to_thread(json.loads, raw)
            )
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"malformed JSON body: {e}") from None
        except RecursionError:  # valid JSON nested deeper than the parser follows
            raise _bad("malformed JSON body: nested too deeply") from None
        if not isinstance(data, dict):
            raise _bad("the request body must be a JSON object")
        return data

    def _validate(self, data: dict, cls: type[BaseModel]) -> Any:
        try:
            body = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = [str(x) for x in err["loc"]]
            param = loc[0] if loc else None
            raise _bad(f"{'.'.join(loc)}: {err['msg']}" if loc else err["msg"], param) from None
        model = getattr(body, "model", None)
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist", "NotFoundError", "model")
        return body

    async def _parse(self, request: Request, cls: type[_Common]) -> Any:
        body = self._validate(await self._read_json(request), cls)
        field = body.unsupported_field()
        if field is not None:
            raise _bad(f"{field} is not supported by this server", field)
        if body.stream_options is not None and not body.stream:
            raise _bad("stream_options can only be set when stream is true", "stream_options")
        if body.stream and body.prompt_logprobs:  # as vLLM: a stream has no place for them
            raise _bad("prompt_logprobs are not available when stream is true", "prompt_logprobs")
        self._truncation(body.truncate_prompt_tokens)
        if isinstance(body, ChatCompletionRequest):
            self._check_chat_template(body)
        self._check_logit_bias(body.logit_bias)
        return body

    def _truncation(self, k: int | None) -> int | None:
        """vLLM's truncate_prompt_tokens: how many of the prompt's last tokens to keep (-1: the context)."""
        if k is None:
            return None
        limit = self.llm_engine.max_model_len
        if k == 0:
            raise _bad("truncate_prompt_tokens must be -1 or at least 1, got 0", "truncate_prompt_tokens")
        if k > limit:
            raise _bad(
                f"truncate_prompt_tokens value ({k}) is greater than max_model_len ({limit}). "
                "Please, select a smaller truncation size.",
                "truncate_prompt_tokens",
            )
        return limit if k < 0 else k

    def _check_chat_template(self, body: ChatCompletionRequest | TokenizeChatRequest) -> None:
        """A template sent with the request is Jinja run by this server: only when the server trusts it."""
        kwargs = body.chat_template_kwargs or {}
        if self.trust_request_chat_template:
            return
        if body.chat_template is not None or kwargs.get("chat_template") is not None:
            raise _bad(
                "Chat template is passed with request, but this server does not trust request chat "
                "templates (trust_request_chat_template, vLLM's --trust-request-chat-template). "
                "Refused request with untrusted chat template.",
                "chat_template" if body.chat_template is not None else "chat_template_kwargs",
            )

    def _check_logit_bias(self, bias: dict[str, float] | None) -> None:
        if not bias:
            return
        try:
            self.llm_engine.check_logit_bias(SamplingParams(logit_bias=bias))  # type: ignore[arg-type]
        except ValueError as e:
            raise _bad(str(e), "logit_bias") from None

    def _scheduling(self, request: Request, body: _Common) -> dict[str, Any]:
        """The request's scheduling fields, within what the server and the caller's API key allow."""
        policy: KeyPolicy | None = getattr(request.state, "key_policy", None)
        tenant = body.tenant or "default"
        if policy is not None and policy.tenant is not None:
            if body.tenant is not None and body.tenant != policy.tenant:
                raise APIError(
                    403, f"this API key may not act for tenant {body.tenant!r}", "permission_error", "tenant"
                )
            tenant = policy.tenant
        low, high = self.priority_range
        if body.priority is not None and not low <= body.priority <= high:
            raise _bad(f"priority must be in [{low}, {high}], got {body.priority}", "priority")
        if policy is not None and policy.priority is not None:
            low, high = max(low, policy.priority[0]), min(high, policy.priority[1])
            if body.priority is not None and not low <= body.priority <= high:
                raise _bad(
                    f"this API key allows priorities in [{low}, {high}], got {body.priority}", "priority"
                )
        priority = body.priority if body.priority is not None else min(max(0, low), high)
        return {
            "tenant": tenant,
            "priority": priority,
            "session_id": body.session_id,
            "program_id": body.program_id,
            "tool_name": body.tool_name,
            "final_turn": body.final_turn,
            "slo_class": body.slo_class,
            "cache_salt": body.cache_salt,
        }

    # ---- tokenization (off the event loop) ------------------------------------------------------
    def _encode_now(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch, not encode: it releases the GIL while it works, so a long text tokenized on a
        # worker thread does not stall the event loop (encode holds the GIL for the whole call).
        backend = self.llm_engine.tokenizer.backend
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    async def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            if len(text) < _INLINE_TOKENIZE_CHARS:
                return self.llm_engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            return await asyncio.to_thread(self._encode_now, text, add_special_tokens)
        except (TypeError, ValueError, UnicodeEncodeError) as e:
            # JSON may carry a lone UTF-16 surrogate ("\ud800"): a str that is not Unicode text, which
            # the tokenizer refuses.
            if any("\ud800" <= c <= "\udfff" for c in text):
                raise _bad("the text holds a lone UTF-16 surrogate: it is not valid Unicode") from None
            raise e

    async def _render_chat(self, body: ChatCompletionRequest | TokenizeChatRequest) -> str:
        tok = self.llm_engine.tokenizer
        try:
            generation_prompt, continue_final = body.template_options()
            rendered = [m.as_template_dict() for m in body.messages]
            plain = body.chat_template is None and body.chat_template_kwargs is None and body.documents is None
            if plain and not getattr(body, "tools", None):
                return await asyncio.to_thread(
                    tok.apply_chat_template,
                    rendered,
                    add_generation_prompt=generation_prompt,
                    continue_final_message=continue_final,
                )
            return await asyncio.to_thread(
                self._apply_template_with_options, body, rendered, generation_prompt, continue_final
            )
        except ValueError as e:
            raise _bad(str(e), "messages") from None
        except Exception as e:  # a template may raise anything (jinja errors) for odd conversations
            raise _bad(f"cannot apply the chat template: {e}", "messages") from None

    def _apply_template_with_options(
        self,
        body: ChatCompletionRequest | TokenizeChatRequest,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        continue_final_message: bool,
    ) -> str:
        """The chat rendered as vLLM renders it with a request's chat_template, documents and
        chat_template_kwargs: the kwargs override the other options, and only those the template (or
        apply_chat_template) knows are passed on, as vLLM's resolve_chat_template_kwargs does."""
        hf = self.llm_engine.tokenizer.hf
        template = body.chat_template or getattr(hf, "chat_template", None)
        if not template:
            raise ValueError("the model's tokenizer has no chat template")
        if not isinstance(template, str):
            raise ValueError("the model's tokenizer has several chat templates: send chat_template")
        options: dict[str, Any] = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
        }
        if body.documents is not None:
            options["documents"] = body.documents
        tools = getattr(body, "tools", None)
        if tools:  # with tool_choice "none" (others are refused): rendered as vLLM renders them, no tool calls
            options["tools"] = tools
        accepted = (_template_variables(template) | _apply_chat_template_params(type(hf))) - _NOT_KWARGS
        options.update({k: v for k, v in (body.chat_template_kwargs or {}).items() if k in accepted})
        text = hf.apply_chat_template(messages, chat_template=template, tokenize=False, **options)
        if not isinstance(text, str):
            raise ValueError("the chat template did not render to text")
        return text

    async def _token_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        ids = await self._encode(prompt, add_special_tokens) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise _bad("prompt must contain at least one token", "prompt")
        return ids

    async def _prompt_ids(
        self, prompt: str | list[int], keep: int | None, add_special_tokens: bool = True
    ) -> tuple[list[int], bool]:
        """A prompt's token ids, cut to its last `keep` tokens (vLLM's truncate_prompt_tokens), and whether
        it was cut. Text is cut as vLLM's tokenizer truncates it (on the left, within the special tokens
        the tokenizer adds: a BOS stays first); token ids are sliced."""
        ids = await self._token_ids(prompt, add_special_tokens)
        if keep is None or len(ids) <= keep:
            return ids, False
        if not isinstance(prompt, str) or not add_special_tokens:
            return ids[-keep:], True
        backend = self.llm_engine.tokenizer.backend

        def cut() -> list[int]:
            enc = backend.encode(prompt, add_special_tokens=False)
            body = keep - backend.num_special_tokens_to_add(False)
            if body < 1:
                return ids[-keep:]
            enc.truncate(body, direction="left")
            return backend.post_process(enc, None, True).ids

        return (cut() if len(prompt) < _INLINE_TOKENIZE_CHARS else await asyncio.to_thread(cut)), True

    def _check_context(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        """A prompt with no room left for a token is a 400 in vLLM's words (litellm and other clients
        match "maximum context length"); a prompt that fits is served, with max_tokens trimmed."""
        limit = self.llm_engine.max_model_len
        if len(ids) < limit:
            return
        asked = max_tokens or 0
        raise _bad(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids) + asked} tokens ({len(ids)} in the messages, {asked} in the completion). "
            "Please reduce the length of the messages or completion.",
            param,
        )

    async def _tokenize(self, request: Request) -> dict:
        data = await self._read_json(request)
        if "messages" in data:
            chat = self._validate(data, TokenizeChatRequest)
            self._check_chat_template(chat)
            text = await self._render_chat(chat)
            body: TokenizeChatRequest | TokenizeCompletionRequest = chat
        else:
            body = self._validate(data, TokenizeCompletionRequest)
            text = body.prompt
        ids = await self._encode(text, body.add_special_tokens)
        backend = self.llm_engine.tokenizer.backend
        return {
            "count": len(ids),
            "max_model_len": self.llm_engine.max_model_len,
            "tokens": ids,
            "token_strs": [backend.id_to_token(t) for t in ids] if body.return_token_strs else None,
        }

    async def _detokenize(self, request: Request) -> dict:
        body: DetokenizeRequest = self._validate(await self._read_json(request), DetokenizeRequest)
        vocab = self.llm_engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise _bad(f"token ids out of range for a vocabulary of {vocab}: {bad[:5]}", "tokens")
        decode = self.llm_engine.tokenizer.decode
        if len(body.tokens) < _INLINE_TOKENIZE_CHARS:
            text = decode(body.tokens, skip_special_tokens=False)
        else:
            text = await asyncio.to_thread(decode, body.tokens, skip_special_tokens=False)
        return {"prompt": text}

    # ---- shared ---------------------------------------------------------------------------------
    async def _start(
        self, body: Any, scheduling: dict[str, Any], prompts: list[list[int]], params_of: Any, prefix: str
    ) -> list:
        """Add every prompt to the engine at once; on any error none of them stays added."""
        arrival = self.engine.now()
        extra = dict(
            **scheduling,
            deadline=None if body.deadline_ms is None else arrival + body.deadline_ms / 1000.0,
            arrival_time=arrival,
        )
        # One engine command for all of them: a list of prompts enters the scheduler at once, not one
        # engine step per prompt (the engine thread would step between separate adds).
        items = [
            (f"{prefix}-{i}", {"prompt_token_ids": ids}, params_of(ids)) for i, ids in enumerate(prompts)
        ]
        try:
            return await self.engine.add_many(items, **extra)  # all or nothing
        except ValueError as e:
            raise _bad(str(e)) from None
        except QueueFullError as e:
            raise APIError(
                429, str(e), "rate_limit_error", headers={"Retry-After": str(self.retry_after_s)}
            ) from None
        except EngineDeadError as e:
            raise _api_error_of(e) from None

    def _params(self, make: Any) -> Any:
        limit = self.llm_engine.max_model_len

        def params_of(ids: list[int]) -> Any:
            try:
                params = make(ids)
            except ValueError as e:
                raise _bad_params(e) from None
            if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
                # The prompt fits (checked before): trim the completion to the context and serve, as vLLM
                # does, rather than refusing a max_tokens that clients often set generously.
                params.max_tokens = limit - len(ids)
                params.min_tokens = min(params.min_tokens, params.max_tokens)
            return params

        return params_of

    @staticmethod
    async def _final(stream: RequestStream) -> RequestOutput:
        last = None
        async for out in stream:
            last = out
        assert last is not None and last.finished
        return last

    @staticmethod
    async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several streams as they come, tagged with the stream's index."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: RequestStream) -> None:
            try:
                async for out in s:
                    await queue.put((i, out))
            except Exception as e:
                await queue.put((i, e))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        left = len(streams)
        try:
            while left:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield i, item
                if item.finished:
                    left -= 1
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _decode(self, t: int) -> str:
        return self.llm_engine.tokenizer.decode([t], skip_special_tokens=False)

    @staticmethod
    def _running_usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @staticmethod
    def _usage(prompts: list[list[int]], outputs: list[RequestOutput]) -> dict:
        p = sum(len(x) for x in prompts)
        c = sum(len(o.token_ids) for out in outputs for o in out.outputs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # ---- /v1/completions ------------------------------------------------------------------------
    async def _completions(self, request: Request, body: CompletionRequest) -> Response:
        try:
            raw_prompts = body.prompts()
        except ValueError as e:
            raise _bad(str(e), "prompt") from None
        try:
            body.to_sampling_params()  # validates once before tokenizing
        except ValueError as e:
            raise _bad_params(e) from None
        scheduling = self._scheduling(request, body)
        keep = self._truncation(body.truncate_prompt_tokens)
        tokenized = [await self._prompt_ids(p, keep) for p in raw_prompts]
        prompts = [ids for ids, _ in tokenized]
        for ids in prompts:
            self._check_context(ids, body.max_tokens, "prompt")
        max_len = self.llm_engine.max_model_len
        score_only = body.scores_prompt_only

        def make(ids: list[int]) -> Any:
            params = body.to_sampling_params()
            if params.max_tokens is None:
                params.max_tokens = max_len - len(ids)
            return params

        rid, engine_id = _response_ids("cmpl", request)
        streams = await self._start(body, scheduling, prompts, self._params(make), engine_id)
        echo_texts = [
            # Token ids echo as their whole text, special tokens included (as vLLM echoes them); so does a
            # truncated prompt: the text of the tokens the completion followed.
            (
                p
                if isinstance(p, str) and not cut
                else self.llm_engine.tokenizer.decode(ids, skip_special_tokens=False)
            )
            if body.echo
            else ""
            for p, (ids, cut) in zip(raw_prompts, tokenized)
        ]
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                self._stream_completions(body, rid, created, prompts, streams, echo_texts),
                media_type="text/event-stream",
            )

        async def collect() -> list[RequestOutput]:
            return list(await asyncio.gather(*(self._final(s) for s in streams)))

        outputs = await _unless_disconnected(request, collect())
        if outputs is None:
            return Response(status_code=499)
        if score_only:
            outputs = [_without_completion(out) for out in outputs]
        choices = []
        as_ids = bool(body.return_tokens_as_token_ids)
        for i, out in enumerate(outputs):
            prompt_logprobs = self._prompt_logprobs(out.prompt_logprobs, prompts[i], body.num_prompt_logprobs)
            for o in out.outputs:
                text, logprobs = o.text, None
                if body.logprobs is not None:
                    start = len(echo_texts[i]) if body.echo else 0
                    logprobs = self._completion_logprobs(
                        o.logprobs or [], o.token_ids, body.logprobs, start, as_ids
                    )
                    if body.echo:
                        plp = self._completion_logprobs(
                            out.prompt_logprobs or [], prompts[i], body.logprobs, 0, as_ids
                        )
                        logprobs = {k: plp[k] + logprobs[k] for k in logprobs}
                if body.echo:
                    text = echo_texts[i] + text
                choice = self._completion_choice(i * body.n + o.index, text, logprobs, o)
                choice["prompt_logprobs"] = prompt_logprobs  # vLLM's (null unless asked for)
                choices.append(choice)
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": choices,
                "usage": self._usage(prompts, outputs),
            }
        )

    @staticmethod
    def _completion_choice(index: int, text: str, logprobs: dict | None, o: CompletionOutput | None) -> dict:
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": o.finish_reason if o else None,
            "stop_reason": o.stop_reason if o else None,
        }

    def _prompt_logprobs(self, entries: list | None, token_ids: list[int], k: int | None) -> list | None:
        """vLLM's prompt_logprobs: per prompt token (the first has none: null), {token id: {"logprob",
        "rank", "decoded_token"}} for the prompt token and the k most likely tokens there; -inf is
        clamped to -9999.0 as vLLM clamps it (JSON has no infinity)."""
        if entries is None or k is None:
            return None
        out: list[dict | None] = []
        for t, entry in zip(token_ids, entries):
            if entry is None:
                out.append(None)
                continue
            out.append(
                {
                    str(tid): {
                        "logprob": max(lp.logprob, -9999.0),
                        "rank": lp.rank,
                        "decoded_token": lp.decoded_token if lp.decoded_token is not None else self._decode(tid),
                    }
                    # The engine may have computed more alternatives (for an echo's logprobs): keep k.
                    for tid, lp in entry.items()
                    if tid == t or (lp.rank is not None and lp.rank <= k)
                }
            )
        return out

    def _token_str(self, t: int, text: str | None, as_ids: bool) -> str:
        """A token as logprobs show it: its text, or vLLM's "token_id:N" (return_tokens_as_token_ids)."""
        if as_ids:
            return f"token_id:{t}"
        return text if text is not None else self._decode(t)

    def _completion_logprobs(
        self, entries: list, token_ids: list[int], k: int, start: int = 0, as_ids: bool = False
    ) -> dict:
        """OpenAI's legacy logprobs object; a None entry (the first prompt token) has no logprob.
        text_offset counts from `start`: where the first token's text begins in the choice's whole text
        (after an echoed prompt, after what earlier chunks of a stream carried); with `as_ids` tokens are
        "token_id:N" (vLLM's return_tokens_as_token_ids), and the offsets still count the tokens' text."""
        tokens, lps, tops, offsets = [], [], [], []
        offset = start
        for t, entry in zip(token_ids, entries):
            s = self._decode(t)
            tokens.append(self._token_str(t, s, as_ids))
            offsets.append(offset)
            offset += len(s)
            if entry is None:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(entry[t].logprob if t in entry else None)
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 0)
            top: dict[str, float] = {}
            for tid, lp in ranked:
                if tid == t or len(top) < k:
                    top[self._token_str(tid, lp.decoded_token, as_ids)] = lp.logprob
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _stream_completions(
        self,
        body: CompletionRequest,
        rid: str,
        created: int,
        prompts: list[list[int]],
        streams: list[RequestStream],
        echo_texts: list[str],
    ) -> AsyncIterator[str]:
        sent_text: dict[int, int] = {}
        ended: set[int] = set()  # choices whose finish_reason went out (n > 1: outputs repeat every sample)
        offsets: dict[int, int] = {}  # the next token's text_offset, per choice (as the whole response's)
        sent_tokens: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        as_ids = bool(body.return_tokens_as_token_ids)

        def chunk(choice: dict, prompt: int) -> str:
            obj: dict[str, Any] = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [choice],
            }
            if body.continuous_usage:  # vLLM's: the usage so far, of this chunk's choice
                obj["usage"] = self._running_usage(len(prompts[prompt]), sent_tokens[choice["index"]])
            return _sse(obj)

        try:
            async for i, out in self._merge(streams):
                if body.scores_prompt_only:
                    out = _without_completion(out)
                if out.finished:
                    finals[i] = out
                for o in out.outputs:
                    index = i * body.n + o.index
                    if index not in sent_text:
                        sent_text[index] = sent_tokens[index] = 0
                        if body.echo:
                            logprobs = None
                            if body.logprobs is not None:
                                logprobs = self._completion_logprobs(
                                    out.prompt_logprobs or [], prompts[i], body.logprobs, 0, as_ids
                                )
                            yield chunk(self._completion_choice(index, echo_texts[i], logprobs, None), i)
                    if index in ended:
                        continue
                    done = o.finish_reason is not None
                    if done:
                        ended.add(index)
                    delta = o.text[sent_text[index] :]
                    new_ids = o.token_ids[sent_tokens[index] :]
                    if not delta and not done and not (new_ids and body.logprobs is not None):
                        continue
                    logprobs = None
                    if body.logprobs is not None:
                        start = offsets.get(index, len(echo_texts[i]) if body.echo else 0)
                        logprobs = self._completion_logprobs(
                            (o.logprobs or [])[sent_tokens[index] :], new_ids, body.logprobs, start, as_ids
                        )
                        if logprobs["tokens"]:  # the next chunk's tokens go on where these end
                            last = new_ids[len(logprobs["tokens"]) - 1]
                            offsets[index] = logprobs["text_offset"][-1] + len(self._decode(last))
                    sent_text[index] = len(o.text)
                    sent_tokens[index] = len(o.token_ids)
                    yield chunk(self._completion_choice(index, delta, logprobs, o if done else None), i)
            if body.include_usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": self.model_name,
                        "choices": [],
                        "usage": self._usage(prompts, [finals[i] for i in sorted(finals)]),
                    }
                )
        except Exception as e:  # the status line is sent already: report in-band, like vLLM
            yield _sse_error(e)
        yield "data: [DONE]\n\n"

    # ---- /v1/chat/completions -------------------------------------------------------------------
    async def _chat(self, request: Request, body: ChatCompletionRequest) -> Response:
        max_len = self.llm_engine.max_model_len
        make = self._params(lambda ids: body.to_sampling_params(max_len - len(ids)))
        try:
            body.to_sampling_params(max_len)  # validates before rendering and tokenizing
        except ValueError as e:
            raise _bad_params(e) from None
        scheduling = self._scheduling(request, body)
        text = await self._render_chat(body)
        keep = self._truncation(body.truncate_prompt_tokens)
        ids, _ = await self._prompt_ids(text, keep, add_special_tokens=False)
        self._check_context(ids, body.max_completion_tokens or body.max_tokens, "messages")
        make(ids)  # validate before adding
        rid, engine_id = _response_ids("chatcmpl", request)
        streams = await self._start(body, scheduling, [ids], make, engine_id)
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                self._stream_chat(body, rid, created, ids, streams[0]), media_type="text/event-stream"
            )
        out = await _unless_disconnected(request, self._final(streams[0]))
        if out is None:
            return Response(status_code=499)
        as_ids = bool(body.return_tokens_as_token_ids)
        choices = [
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": self._chat_logprobs(o.logprobs or [], o.token_ids, body.top_logprobs or 0, as_ids)
                if body.logprobs
                else None,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
            for o in out.outputs
        ]
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self.model_name,
                "choices": choices,
                "usage": self._usage([ids], [out]),
                # vLLM's (null unless asked for)
                "prompt_logprobs": self._prompt_logprobs(out.prompt_logprobs, ids, body.prompt_logprobs),
            }
        )

    def _chat_logprobs(
        self, entries: list[dict[int, Logprob]], token_ids: list[int], k: int, as_ids: bool = False
    ) -> dict:
        """OpenAI's chat logprobs; with `as_ids` tokens are "token_id:N" (vLLM's return_tokens_as_token_ids)
        and `bytes` stay the bytes of the tokens' text."""
        content = []
        for t, entry in zip(token_ids, entries):
            s = self._decode(t)
            ranked = sorted(
                ((tid, lp) for tid, lp in entry.items() if lp.rank is not None),
                key=lambda kv: kv[1].rank,  # type: ignore[arg-type,return-value]
            )
            top = []
            for tid, lp in ranked[:k]:
                ts = lp.decoded_token if lp.decoded_token is not None else self._decode(tid)
                top.append(
                    {"token": self._token_str(tid, ts, as_ids), "logprob": lp.logprob, "bytes": list(ts.encode())}
                )
            content.append(
                {
                    "token": self._token_str(t, s, as_ids),
                    "logprob": entry[t].logprob,
                    "bytes": list(s.encode()),
                    "top_logprobs": top,
                }
            )
        return {"content": content}

    async def _stream_chat(
        self,
        body: ChatCompletionRequest,
        rid: str,
        created: int,
        ids: list[int],
        stream: RequestStream,
    ) -> AsyncIterator[str]:
        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            obj: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }
            if usage is not None:
                obj["usage"] = usage
            return _sse(obj)

        sent_text = [0] * body.n
        sent_tokens = [0] * body.n
        as_ids = bool(body.return_tokens_as_token_ids)
        # vLLM's continuous_usage_stats: every chunk carries the usage so far (of its choice).
        running = (lambda j: self._running_usage(len(ids), sent_tokens[j])) if body.continuous_usage else None
        ended: set[int] = set()  # choices whose finish_reason went out (n > 1: outputs repeat every sample)
        # Sent with (just before, in the same write as) the first chunk that carries a token, as vLLM
        # does: a client timing its first chunk then measures the time to the first token, not to
        # the request's admission.
        role: str | None = chunk(
            [
                {
                    "index": j,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for j in range(body.n)
            ],
            running(0) if running else None,
        )
        try:
            final = None
            async for _, out in self._merge([stream]):
                if out.finished:
                    final = out
                for o in out.outputs:
                    j = o.index
                    if j in ended:
                        continue
                    done = o.finish_reason is not None
                    if done:
                        ended.add(j)
                    delta = o.text[sent_text[j] :]
                    new_ids = o.token_ids[sent_tokens[j] :]
                    if not delta and not done and not (new_ids and body.logprobs):
                        if role is not None and new_ids:  # a first token with no text yet (held back)
                            yield role
                            role = None
                        continue
                    logprobs = None
                    if body.logprobs:
                        logprobs = self._chat_logprobs(
                            (o.logprobs or [])[sent_tokens[j] :], new_ids, body.top_logprobs or 0, as_ids
                        )
                    sent_text[j], sent_tokens[j] = len(o.text), len(o.token_ids)
                    head, role = role or "", None
                    yield head + chunk(
                        [
                            {
                                "index": j,
                                "delta": {"content": delta} if delta else {},
                                "logprobs": logprobs,
                                "finish_reason": o.finish_reason,
                                "stop_reason": o.stop_reason,
                            }
                        ],
                        running(j) if running else None,
                    )
            if role is not None:  # finished without a chunk to send (not expected): the role still goes out
                yield role
            if body.include_usage and final is not None:
                yield chunk([], self._usage([ids], [final]))
        except Exception as e:
            yield _sse_error(e)
        yield "data: [DONE]\n\n"


def build_app(engine: EngineFrontend, served_model_name: str, **kwargs: Any) -> FastAPI:
    return OpenAIServer(engine, served_model_name, **kwargs).app


def run_server(
    engine: EngineFrontend,
    served_model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    **kwargs: Any,
) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening: say so at every log level (uvicorn's own line is info only)
                # The port bound (--port 0 asks the system for a free one), and an IPv6 host in brackets.
                servers = getattr(self, "servers", [])
                bound = [s.getsockname()[1] for server in servers for s in server.sockets]
                url = f"http://{f'[{host}]' if ':' in host else host}:{bound[0] if bound else port}/v1"
                print(
                    f"quanta serve: ready, {served_model_name} on {url}",
                    file=sys.stderr,
                    flush=True,
                )

    app = build_app(engine, served_model_name, **kwargs)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    Server(config).run()


# A client's X-Request-Id (vLLM's): the response's id is built from it, and it is echoed back. Bounded
# and plain, since it reaches logs and the engine's request ids.
_REQUEST_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:/=+@")
_MAX_REQUEST_ID = 128


def _client_request_id(request: Request) -> str | None:
    """The request's X-Request-Id header, when it is a plausible id (else None: a generated id is used)."""
    value = request.headers.get("x-request-id")
    if value and len(value) <= _MAX_REQUEST_ID and set(value) <= _REQUEST_ID_CHARS:
        return value
    return None


def _response_ids(kind: str, request: Request) -> tuple[str, str]:
    """(the response's id, the prefix of its requests' engine ids: `<prefix>-<prompt index>`). The same,
    unless the client named the response (X-Request-Id): then the engine's ids get a suffix of their own,
    as clients may reuse a name while its requests still run."""
    client = _client_request_id(request)
    if client is None:
        rid = f"{kind}-{uuid.uuid4().hex}"
        return rid, rid
    rid = f"{kind}-{client}"
    return rid, f"{rid}-{uuid.uuid4().hex[:8]}"


def _echo_request_id(request: Request, response: Response) -> Response:
    value = _client_request_id(request)
    if value is not None:
        response.headers["X-Request-Id"] = value
    return response


@functools.lru_cache(maxsize=64)
def _template_variables(template: str) -> frozenset[str]:
    """The variables a Jinja chat template reads (what chat_template_kwargs may set, as in vLLM)."""
    import jinja2
    import jinja2.meta

    try:
        return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))
    except jinja2.TemplateError as e:
        raise ValueError(f"cannot parse the chat template: {e}") from None


@functools.lru_cache(maxsize=8)
def _apply_chat_template_params(cls: type) -> frozenset[str]:
    """apply_chat_template's named options, less those vLLM never takes from chat_template_kwargs."""
    params = inspect.signature(cls.apply_chat_template).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(named - {"self", "conversation"})
