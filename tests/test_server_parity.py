"""vLLM parity of the OpenAI server, on a server started in this process (real engine, real HTTP on
127.0.0.1, the official `openai` client, raw HTTP where the client cannot say it): when the first chat chunk
goes out, prompt lists entering the scheduler at once, JSON-only bodies and CORS, context-length errors,
prompt scoring (echo with max_tokens=0), and /openapi.json and /ping."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

openai = pytest.importorskip("openai")

from server_harness import MODEL, InProcessServer  # noqa: E402


@pytest.fixture(scope="module")
def srv(llama_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(llama_dir) as s:
        yield s


@contextlib.contextmanager
def _watch_steps(srv: InProcessServer, before: Callable[[], None] | None = None) -> Iterator[list[dict]]:
    """Records each engine step (on the engine thread): the requests in the scheduler when it starts, and
    when it returned a first token. `before` runs ahead of every step."""
    engine = srv.engine
    real = engine.step
    steps: list[dict] = []

    def step(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before()
        sched = engine.core.scheduler
        record = {"queued": len(sched.waiting) + len(sched.running)}
        outputs = real(*args, **kwargs)
        record["tokens_at"] = (
            time.monotonic() if any(o.token_ids for out in outputs for o in out.outputs) else None
        )
        steps.append(record)
        return outputs

    engine.step = step  # type: ignore[method-assign]
    try:
        yield steps
    finally:
        engine.step = real  # type: ignore[method-assign]


def _raw(
    srv: InProcessServer, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, Any, http.client.HTTPMessage]:
    """A request with exactly these headers (urllib would add a Content-Type of its own)."""
    url = urlparse(srv.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload: Any = json.loads(raw)
        except json.JSONDecodeError:
            payload = raw.decode()
        return resp.status, payload, resp.headers
    finally:
        conn.close()


def _assert_error(payload: dict, code: int) -> dict:
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == code
    return err


# ---- 1. the first chat chunk goes out with the first token ---------------------------------------------
def test_chat_stream_first_chunk_comes_with_the_first_token(srv: InProcessServer) -> None:
    first_step = threading.Event()

    def slow_first_step() -> None:  # the first token is late: a role chunk sent on admission would lead it
        if not first_step.is_set():
            first_step.set()
            time.sleep(0.5)

    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "tell me a story " * 20}],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    with _watch_steps(srv, slow_first_step) as steps:
        stream = srv.client().chat.completions.create(**kw, stream=True)
        chunks = []
        for c in stream:
            chunks.append((time.monotonic(), c))
    first_token_at = next(s["tokens_at"] for s in steps if s["tokens_at"] is not None)
    assert chunks[0][0] >= first_token_at
    assert chunks[0][1].choices[0].delta.role == "assistant"
    assert chunks[1][1].choices[0].delta.content  # the next chunk is the first token
    assert [c.choices[0].delta.role for _, c in chunks if c.choices].count("assistant") == 1

    # On the wire: the role event and the first content event are the first two events.
    raw = {k: v for k, v in kw.items() if k != "extra_body"}
    events = srv.sse("/v1/chat/completions", {**raw, "ignore_eos": True, "stream": True, "n": 2})
    assert {c["index"] for c in events[0]["choices"]} == {0, 1}
    assert all(c["delta"]["role"] == "assistant" for c in events[0]["choices"])
    assert events[1]["choices"][0]["delta"]["content"] and events[-1] == "[DONE]"


# ---- 2. a list of prompts enters the scheduler at once ---------------------------------------------------
@pytest.mark.parametrize("token_ids", [False, True], ids=["text", "token-ids-n2"])
def test_prompt_lists_enter_the_scheduler_at_once(srv: InProcessServer, token_ids: bool) -> None:
    words = ["once", "upon", "a", "time", "the", "kv", "cache", "block"]
    if token_ids:
        prompts: list = [[5 + i % 50, 6 + i % 7, 7] for i in range(100)]
        n = 2
    else:
        prompts = [f"{words[i % 8]} {words[(i // 8) % 8]} {i}" for i in range(200)]
        n = 1
    srv.wait_idle()
    with _watch_steps(srv) as steps:
        out = srv.client().completions.create(
            model=MODEL, prompt=prompts, max_tokens=2, n=n, temperature=0, extra_body={"ignore_eos": True}
        )
    assert len(out.choices) == len(prompts) * n == 200
    assert sorted(c.index for c in out.choices) == list(range(200))
    # Every request is in the scheduler when the first step starts (one step apart, the first step would
    # have seen one), and the whole batch takes a few steps, far fewer than its prompts.
    assert steps[0]["queued"] == 200
    assert len(steps) <= 10
    assert srv.wait_idle()["integrity_ok"]


# ---- 3. JSON bodies only; CORS only when configured --------------------------------------------------
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_post_bodies_must_be_json(srv: InProcessServer, content_type: str | None) -> None:
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        status, payload, hdrs = _raw(srv, "POST", path, body, headers)
        assert status == 415, (path, payload)
        assert _assert_error(payload, 415)["type"] == "invalid_request_error"
        assert "access-control-allow-origin" not in {k.lower() for k in hdrs}


def test_json_with_a_charset_is_accepted_and_no_cors_by_default(srv: InProcessServer) -> None:
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    ct = {"Content-Type": "application/json; charset=utf-8", "Origin": "https://evil.example"}
    status, payload, hdrs = _raw(srv, "POST", "/v1/completions", body, ct)
    assert status == 200, payload
    assert "access-control-allow-origin" not in {k.lower() for k in hdrs}
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    status, _, hdrs = _raw(srv, "OPTIONS", "/v1/completions", None, preflight)
    assert status != 200 and "access-control-allow-origin" not in {k.lower() for k in hdrs}


def test_cors_origins_option(llama_dir: Path) -> None:
    origin = "https://app.example"
    with InProcessServer(llama_dir, cors_origins=[origin], api_key="k") as s:
        preflight = {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        status, _, hdrs = _raw(s, "OPTIONS", "/v1/completions", None, preflight)  # no key: a preflight
        assert status == 200 and hdrs["access-control-allow-origin"] == origin
        body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
        headers = {"Origin": origin, "Content-Type": "application/json", "Authorization": "Bearer k"}
        status, payload, hdrs = _raw(s, "POST", "/v1/completions", body, headers)
        assert status == 200 and hdrs["access-control-allow-origin"] == origin, payload
        status, _, hdrs = _raw(
            s, "OPTIONS", "/v1/completions", None, {**preflight, "Origin": "https://x.example"}
        )
        assert status == 400 and "access-control-allow-origin" not in {k.lower() for k in hdrs}


# ---- 4. context-length errors as vLLM's ----------------------------------------------------------------
def test_max_tokens_is_trimmed_to_the_context(srv: InProcessServer) -> None:
    client = srv.client()
    out = client.completions.create(
        model=MODEL, prompt=[5] * 200, max_tokens=100, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 56  # 256 - 200
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=300,
        temperature=0,
        extra_body={"ignore_eos": True, "min_tokens": 290},
    )
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == 256
    assert chat.choices[0].finish_reason == "length"
    assert srv.wait_idle()["integrity_ok"]


def test_a_prompt_longer_than_the_context_is_refused_in_vllms_words(srv: InProcessServer) -> None:
    client = srv.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 256)
    assert e.value.body["message"] == (
        "This model's maximum context length is 256 tokens. However, you requested 272 tokens "
        "(256 in the messages, 16 in the completion). Please reduce the length of the messages or completion."
    )
    assert e.value.body["param"] == "prompt" and e.value.body["code"] == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 300}], max_tokens=10
        )
    assert "maximum context length is 256 tokens" in e.value.body["message"]
    assert "10 in the completion" in e.value.body["message"] and e.value.body["param"] == "messages"


# ---- 5. prompt scoring: echo with max_tokens=0 -----------------------------------------------------------
def test_echo_with_max_tokens_zero_scores_the_prompt(srv: InProcessServer) -> None:
    client = srv.client()
    prompt = "Once upon a time there was"
    n_prompt = srv.http("POST", "/tokenize", {"prompt": prompt})[1]["count"]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == n_prompt
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    # The same prompt logprobs as an echo that also generates.
    longer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    assert lp.token_logprobs[1:] == pytest.approx(
        longer.choices[0].logprobs.token_logprobs[1:n_prompt], abs=1e-4
    )

    plain = client.completions.create(model=MODEL, prompt=[prompt, "the kv cache"], max_tokens=0, echo=True)
    assert [c.text for c in plain.choices] == [prompt, "the kv cache"] and plain.choices[0].logprobs is None

    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == prompt
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == n_prompt

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)
    assert "max_tokens" in e.value.body["message"]
    assert srv.wait_idle()["integrity_ok"]


# ---- 6. /openapi.json, /ping, and vLLM's other routes ----------------------------------------------------
def test_openapi_ping_and_vllm_routes(srv: InProcessServer) -> None:
    status, schema, _ = srv.http("GET", "/openapi.json")
    assert status == 200 and schema["openapi"].startswith("3.") and schema["info"]["title"] == "quanta"
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                 "/version", "/health", "/ping", "/metrics"):  # fmt: skip
        assert path in schema["paths"], path
    assert set(schema["paths"]["/ping"]) == {"get", "post"}
    assert _raw(srv, "GET", "/ping", None, {})[0] == 200
    assert _raw(srv, "POST", "/ping", None, {})[0] == 200  # no body, no Content-Type needed
    assert srv.http("GET", "/version")[0] == 200
    assert srv.http("POST", "/tokenize", {"prompt": "hi"})[0] == 200
    assert srv.http("POST", "/detokenize", {"tokens": [5, 6]})[0] == 200
