"""`quanta serve` end to end: a real server process on 127.0.0.1 with a random-weight model, driven by the
official `openai` client, raw HTTP for malformed input, aiohttp for disconnects, and `quanta bench serve`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
from helpers import run_cli  # noqa: E402
from server_harness import MODEL, Server  # noqa: E402

API_KEY = "sekret"


@pytest.fixture(scope="module")
def servers(llama_dir: Path) -> Iterator[tuple[Server, Server]]:
    # Started together; the second has an API key and a tiny queue (one running request, one waiting).
    main = Server(llama_dir)
    guarded = Server(llama_dir, "--api-key", API_KEY, "--max-num-seqs", "1", "--max-waiting-requests", "1")
    try:
        main.wait()
        guarded.wait()
        yield main, guarded
    finally:
        main.stop()
        guarded.stop()


@pytest.fixture(scope="module")
def server(servers: tuple[Server, Server]) -> Server:
    return servers[0]


PROMPTS = ["Once upon a time", "The scheduler decides", "def fibonacci(n):"]


def test_models_and_health(server: Server) -> None:
    assert server.http("HEAD", "/health")[0] == 200
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.http("GET", "/health")[0] == 200


def test_greedy_completions_equal_llm_generate(server: Server, llama_dir: Path) -> None:
    from quanta import LLM, SamplingParams

    client = server.client()
    resp = client.completions.create(
        model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    llm = LLM(model=str(llama_dir), cpu_kernels=False, max_model_len=256, num_kv_blocks=64)
    expected = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == [
        e.outputs[0].text for e in expected
    ]
    assert all(c.finish_reason == "length" for c in resp.choices)
    tok = llm.engine.tokenizer
    assert resp.usage.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)
    assert resp.usage.completion_tokens == 12 * len(PROMPTS)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    # Token-id prompts give the same result as their text.
    ids = tok.encode(PROMPTS[0])
    by_ids = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert by_ids.choices[0].text == expected[0].outputs[0].text


def test_streaming_completion_matches_non_streaming(server: Server) -> None:
    client = server.client()
    kw = dict(model=MODEL, prompt=PROMPTS[:2], max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    texts = ["", ""]
    usage = None
    finish = {}
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == [c.text for c in sorted(full.choices, key=lambda c: c.index)]
    assert finish == {0: "length", 1: "length"}
    assert usage is not None and usage.completion_tokens == 20
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_n_samples_and_seed_reproducibility(server: Server) -> None:
    client = server.client()
    kw = dict(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=1.0,
        n=3,
        seed=1234,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # samples differ from each other
    assert a.usage.completion_tokens == 3 * 8
    # Streamed, each choice says how it finished once, however long the others go on after it.
    for path, body in (
        ("/v1/completions", {"prompt": PROMPTS[0]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[0]}]}),
    ):
        body = {**body, "model": MODEL, "n": 4, "temperature": 1.0, "seed": 7, "max_tokens": 12, "stream": True}
        events = server.sse(path, {**body, "stop": [" ", "e", "a"]})
        finishes = [c["index"] for e in events if isinstance(e, dict) for c in e["choices"] if c.get("finish_reason")]
        assert sorted(finishes) == [0, 1, 2, 3], (path, finishes)


def test_stop_strings(server: Server) -> None:
    client = server.client()
    base = (
        client.completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = base[len(base) // 2 : len(base) // 2 + 2]
    assert stop.strip(), base
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop])
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == base[: base.index(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop], stream=True
        )
        if c.choices
    )
    assert streamed == choice.text


def test_logprobs_and_echo(server: Server) -> None:
    client = server.client()
    prompt = PROMPTS[2]
    out = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=5,
        temperature=0,
        logprobs=2,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    choice = out.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    n_prompt = out.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + 5
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    for top, chosen in zip(lp.top_logprobs[n_prompt:], lp.token_logprobs[n_prompt:]):
        assert 2 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: the sampled token is the best
    # text_offset: where each token starts in the choice's whole text (prompt, then completion), and the
    # same offsets when the completion is streamed.
    offsets = lp.text_offset
    assert offsets == sorted(offsets) and offsets[n_prompt] >= len(prompt)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs.text_offset
    streamed = [
        x for c in client.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
        for x in c.choices[0].logprobs.text_offset
    ]  # fmt: skip
    assert streamed == whole and whole[0] == 0 and whole == sorted(whole)

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 == chat.usage.completion_tokens
    assert all(
        len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content
    )


def test_chat_streaming_and_usage(server: Server, llama_dir: Path) -> None:
    from quanta.engine.tokenizer import Tokenizer

    client = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.role == "assistant"
    tok = Tokenizer(llama_dir)
    assert full.usage.prompt_tokens == len(
        tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    )
    assert full.usage.completion_tokens == 9
    text, usage, roles = "", None, []
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.delta.role:
                roles.append(c.delta.role)
    assert text == full.choices[0].message.content
    assert roles == ["assistant"]
    assert usage is not None and usage.completion_tokens == 9


BAD_REQUESTS = [
    ("negative max_tokens", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400),
    ("temperature out of range", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 9}, 400),
    ("prompt longer than the context", "/v1/completions", {"model": MODEL, "prompt": [5] * 300}, 400),
    ("token id out of range", "/v1/completions", {"model": MODEL, "prompt": [10**7]}, 400),
    ("wrong type", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": "many"}, 400),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400),
    ("empty prompt list", "/v1/completions", {"model": MODEL, "prompt": []}, 400),
    ("top_p zero", "/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400),
    ("seed beyond 64 bits", "/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2**64}, 400),
    ("empty stop string", "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400),
    ("min_tokens above max_tokens", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "min_tokens": 5}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("chat logprobs too many", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99}, 400),
    # (prompt + max_tokens beyond the context is served with max_tokens trimmed: test_server_parity.py)
    ("max_tokens 0 without echo", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
    ("malformed JSON", "/v1/completions", b'{"model": "tiny", "prompt": ', 400),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400),
    ("unknown route", "/v1/embeddings", {"model": MODEL, "input": "x"}, 404),
    # Valid JSON whose strings are not Unicode text, or nested deeper than a parser follows.
    ("lone surrogate in a prompt", "/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', 400),
    ("lone surrogate in a message", "/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    ("JSON nested too deeply", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400),
]  # fmt: skip

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
CMPL = {"model": MODEL, "prompt": "hi"}
# (what, path, body, the param the 400 names): fields that would change the output in ways quanta does not
# implement are refused by name, as vLLM does, and so are out-of-bounds scheduling fields.
REFUSED_FIELDS = [
    ("json output", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("json schema", "/v1/completions", {**CMPL, "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("tool_choice required", "/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("tool_choice named", "/v1/chat/completions", {**CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("functions", "/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
    ("function_call", "/v1/chat/completions", {**CHAT, "function_call": {"name": "f"}}, "function_call"),
    ("best_of", "/v1/completions", {**CMPL, "best_of": 3}, "best_of"),
    ("guided_json", "/v1/completions", {**CMPL, "guided_json": {"type": "object"}}, "guided_json"),
    ("guided_regex", "/v1/chat/completions", {**CHAT, "guided_regex": "[a-z]+"}, "guided_regex"),
    ("guided_choice", "/v1/completions", {**CMPL, "guided_choice": ["a", "b"]}, "guided_choice"),
    ("guided_grammar", "/v1/completions", {**CMPL, "guided_grammar": "root ::= 'a'"}, "guided_grammar"),
    ("guided_whitespace_pattern", "/v1/completions", {**CMPL, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ("guided_decoding_backend", "/v1/completions", {**CMPL, "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ("structured_outputs", "/v1/chat/completions", {**CHAT, "structured_outputs": {"json": {}}}, "structured_outputs"),
    ("suffix", "/v1/completions", {**CMPL, "suffix": "end"}, "suffix"),
    ("chat echo", "/v1/chat/completions", {**CHAT, "echo": True}, "echo"),
    ("stream_options without stream", "/v1/completions", {**CMPL, "stream_options": {"include_usage": True}}, "stream_options"),
    ("logit_bias out of vocabulary", "/v1/completions", {**CMPL, "logit_bias": {"100000": 5}}, "logit_bias"),
    ("logit_bias above 100", "/v1/completions", {**CMPL, "logit_bias": {"5": 101}}, "logit_bias"),
    ("logit_bias key not a token id", "/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("priority out of range", "/v1/completions", {**CMPL, "priority": 10**6}, "priority"),
    ("tenant with odd characters", "/v1/completions", {**CMPL, "tenant": "a/b c"}, "tenant"),
    ("tenant too long", "/v1/completions", {**CMPL, "tenant": "t" * 65}, "tenant"),
    ("deadline beyond a day", "/v1/completions", {**CMPL, "deadline_ms": 86_400_001}, "deadline_ms"),
    ("cache_salt too long", "/v1/completions", {**CMPL, "cache_salt": "s" * 257}, "cache_salt"),
    ("session_id too long", "/v1/chat/completions", {**CHAT, "session_id": "s" * 257}, "session_id"),
]  # fmt: skip
ACCEPTED_FIELDS = [
    {**CHAT, "response_format": {"type": "text"}, "tool_choice": "none", "tools": []},
    {**CHAT, "tool_choice": "auto", "best_of": 1, "function_call": "none"},
    {**CMPL, "best_of": 2, "n": 2, "stream_options": None},
    {**CMPL, "top_k": 2**70, "temperature": 1.0},  # keep everything (it once failed the whole step)
]


@pytest.mark.parametrize("name,path,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_clear_error(server: Server, name: str, path: str, body, status: int) -> None:
    got, payload, _ = server.http("POST", path, body)
    assert got == status, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], payload
    # ... and the server keeps serving, with nothing left behind.
    ok = server.client().completions.create(model=MODEL, prompt="still there?", max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")
    st = server.wait_idle()
    assert st["integrity_ok"] and st["num_free_blocks"] == st["num_blocks"]


@pytest.mark.parametrize("what,path,body,param", REFUSED_FIELDS, ids=[r[0] for r in REFUSED_FIELDS])
def test_refused_fields_are_named(server: Server, what: str, path: str, body: dict, param: str) -> None:
    status, payload, _ = server.http("POST", path, body)
    assert status == 400, payload
    assert payload["error"]["param"] == param and payload["error"]["type"] == "invalid_request_error"
    assert param in payload["error"]["message"]


@pytest.mark.parametrize("body", ACCEPTED_FIELDS)
def test_fields_that_change_nothing_are_accepted(server: Server, body: dict) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, payload, _ = server.http("POST", path, {**body, "max_tokens": 2})
    assert status == 200, payload


def test_openai_client_sees_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-5)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_tokenize_detokenize_version_and_model_card(server: Server, llama_dir: Path) -> None:
    """vLLM's /tokenize (completion and chat forms), /detokenize and /version, and GET /v1/models/{id}."""
    from quanta.engine.tokenizer import Tokenizer

    tok = Tokenizer(llama_dir)
    status, out, _ = server.http("POST", "/tokenize", {"model": MODEL, "prompt": PROMPTS[0]})
    assert status == 200, out
    assert out == {
        "count": len(out["tokens"]),
        "max_model_len": 256,
        "tokens": tok.encode(PROMPTS[0]),
        "token_strs": None,
    }
    status, out, _ = server.http(
        "POST", "/tokenize", {"prompt": PROMPTS[0], "add_special_tokens": False, "return_token_strs": True}
    )
    assert out["tokens"] == tok.encode(PROMPTS[0], add_special_tokens=False)
    assert out["token_strs"] == [tok.backend.id_to_token(t) for t in out["tokens"]]
    status, out, _ = server.http("POST", "/detokenize", {"model": MODEL, "tokens": out["tokens"]})
    assert status == 200 and out == {"prompt": PROMPTS[0]}

    # The chat form counts exactly the prompt tokens a chat completion is charged for.
    messages = [{"role": "user", "content": "hello there"}]
    status, out, _ = server.http("POST", "/tokenize", {"model": MODEL, "messages": messages})
    assert status == 200, out
    chat = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert out["count"] == len(out["tokens"]) == chat.usage.prompt_tokens
    # continue_final_message: the final assistant message stays open (a prefilled reply goes on from it).
    prefilled = [*messages, {"role": "assistant", "content": "The answer is"}]
    body = {"model": MODEL, "messages": prefilled, "add_generation_prompt": False, "continue_final_message": True}
    status, out, _ = server.http("POST", "/tokenize", body)
    assert status == 200 and tok.decode(out["tokens"], skip_special_tokens=False).endswith("The answer is"), out
    cont = server.client().chat.completions.create(
        model=MODEL, messages=prefilled, max_tokens=1,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )  # fmt: skip
    assert cont.usage.prompt_tokens == out["count"]
    status, out, _ = server.http("POST", "/v1/chat/completions", {**body, "add_generation_prompt": True})
    assert status == 400 and "cannot both be true" in out["error"]["message"]
    # Completions echo a token-id prompt as its whole text, special tokens included.
    ids = tok.encode("<|im_start|>user", add_special_tokens=False)
    echo = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True)
    assert echo.choices[0].text.startswith("<|im_start|>user")

    for path, body, param in [
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
    ]:
        status, out, _ = server.http("POST", path, body)
        assert status == 400 and out["error"]["param"] == param, out
    assert server.http("POST", "/tokenize", {"model": "other", "prompt": "x"})[0] == 404

    import quanta

    assert server.http("GET", "/version")[1] == {"version": quanta.__version__}
    card = server.client().models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-9")


def test_logit_bias_through_the_api(server: Server) -> None:
    client = server.client()
    prompt = server.http("POST", "/tokenize", {"prompt": PROMPTS[0]})[1]["tokens"]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    forced = 42
    out = client.completions.create(**kw, logit_bias={str(forced): 100}, logprobs=1)
    assert out.choices[0].text == server.http("POST", "/detokenize", {"tokens": [forced] * 6})[1]["prompt"]
    # Logprobs are the model's own, before the bias (vLLM's default): the same as the model gives these
    # tokens when they are in the prompt.
    echo = client.completions.create(
        model=MODEL, prompt=prompt + [forced] * 6, max_tokens=1, echo=True, logprobs=0
    )
    raw = echo.choices[0].logprobs.token_logprobs[len(prompt) : len(prompt) + 6]
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(raw, abs=1e-4)

    plain = client.completions.create(**kw).choices[0].text
    first = server.http("POST", "/tokenize", {"prompt": plain, "add_special_tokens": False})[1]["tokens"][0]
    assert client.completions.create(**kw, logit_bias={str(first): -100}).choices[0].text != plain
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert (
        chat.choices[0].message.content
        == server.http("POST", "/detokenize", {"tokens": [forced] * 3})[1]["prompt"]
    )


def test_api_key_and_queue_limit(servers: tuple[Server, Server]) -> None:
    _, guarded = servers
    assert guarded.http("GET", "/health")[0] == 200  # health, version and metrics stay open
    assert guarded.http("GET", "/version")[0] == 200
    assert guarded.http("GET", "/metrics")[0] == 200
    for path in ("/tokenize", "/detokenize", "/v1/models/tiny"):  # the rest needs the key
        status, body, _ = guarded.http(
            "POST" if "tokenize" in path else "GET", path, {"prompt": "x", "tokens": [1]}
        )
        assert status == 401 and body["error"]["type"] == "authentication_error", path
    status, body, _ = guarded.http(
        "POST", "/tokenize", {"prompt": "x"}, {"Authorization": f"Bearer {API_KEY}"}
    )
    assert status == 200 and body["count"] >= 1
    for key in ("none", "wrong"):
        with pytest.raises(openai.AuthenticationError):
            guarded.client(key).models.list()
    status, body, _ = guarded.http("POST", "/v1/completions", {"model": MODEL, "prompt": "hi"})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    client = guarded.client(API_KEY)
    assert client.models.list().data[0].id == MODEL

    # One request runs, one may wait; the rest are turned away with 429 and Retry-After.
    auth = {"Authorization": f"Bearer {API_KEY}"}
    # ... but a request that alone is more than the queue takes is refused for good (400, not 429: a retry
    # would be refused again).
    status, payload, _ = guarded.http("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, auth)
    assert status == 400 and "waiting queue" in payload["error"]["message"], payload
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: guarded.http("POST", "/v1/completions", body, auth), range(8)))
    statuses = sorted(r[0] for r in results)
    # Usually two get in (running + waiting); under load the second may arrive while the first still
    # waits to be admitted, and is turned away too.
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}, statuses
    for status, payload, headers in results:
        if status == 429:
            assert headers["Retry-After"] and payload["error"]["type"] == "rate_limit_error"
    st = guarded.wait_idle(headers=auth)
    assert st["integrity_ok"] and st["num_free_blocks"] == st["num_blocks"]
    assert client.completions.create(model=MODEL, prompt="after", max_tokens=2).choices


def test_disconnects_abort_and_free_blocks(server: Server) -> None:
    import aiohttp

    before = server.metrics()

    async def one(session: aiohttp.ClientSession, i: int) -> str:
        body = {
            "model": MODEL,
            "prompt": [5 + i, 6, 7, 8],
            # Those that go away ask for far more than they can get before the server sees them gone
            # (200 tokens of the tiny model took less than that once, under CI's load).
            "max_tokens": 4000 if i % 2 == 0 else 200,
            "stream": True,
            "ignore_eos": True,
        }
        async with session.post(server.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            n = 0
            async for line in r.content:
                if line.startswith(b"data:"):
                    n += 1
                    if i % 2 == 0 and n >= 2:
                        r.close()  # the client goes away mid-stream
                        return "gone"
            return "done"

    async def run() -> list[str]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session, i) for i in range(50)))

    outcomes = asyncio.run(run())
    assert outcomes.count("gone") == 25 and outcomes.count("done") == 25
    st = server.wait_idle()
    assert st == {**st, "num_running": 0, "num_waiting": 0, "integrity_ok": True}
    assert st["num_free_blocks"] == st["num_blocks"]
    after = server.metrics()
    key = (
        "quanta:request_success_total",
        (("finished_reason", "abort"), ("model_name", MODEL), ("tenant", "default")),
    )
    assert after.get(key, 0) - before.get(key, 0) == 25  # aborted, not run to the end
    assert after[("quanta:num_requests_running", (("model_name", MODEL),))] == 0
    assert after[("quanta:kv_cache_usage_perc", (("model_name", MODEL),))] == 0


def test_metrics_counters_move(server: Server) -> None:
    labels = (("model_name", MODEL), ("tenant", "acme"))
    before = server.metrics()
    out = server.client().completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=7,
        temperature=0,
        user="someone",  # OpenAI's end-user id: not a tenant (clients must not mint metric labels with it)
        extra_body={"ignore_eos": True, "tenant": "acme"},
    )
    after = server.metrics()
    assert not any(dict(lab).get("tenant") == "someone" for _, lab in after)

    def delta(name: str, lab: tuple = labels) -> float:
        return after.get((name, lab), 0.0) - before.get((name, lab), 0.0)

    assert delta("quanta:generation_tokens_total") == 7
    assert delta("quanta:prompt_tokens_total") == out.usage.prompt_tokens
    assert delta("quanta:request_success_total", (("finished_reason", "length"), *labels)) == 1
    assert delta("quanta:time_to_first_token_seconds_count") == 1
    assert delta("quanta:inter_token_latency_seconds_count") == 6
    assert delta("quanta:e2e_request_latency_seconds_count") == 1
    assert delta("quanta:request_queue_time_seconds_count") == 1
    assert ("quanta:prefix_cache_queries_total", (("model_name", MODEL),)) in after


def test_cache_salt_isolates_prefix_hits(server: Server) -> None:
    """vLLM's `cache_salt`: a prompt cached under one salt is a miss under another and a hit under its own."""
    key = ("quanta:prefix_cache_hits_total", (("model_name", MODEL),))
    prompt = list(range(100, 180))  # 80 tokens: 5 full blocks of 16

    def hits_after(salt: str) -> float:
        server.client().completions.create(
            model=MODEL, prompt=prompt, max_tokens=1, extra_body={"cache_salt": salt}
        )
        return server.metrics().get(key, 0.0)

    first = hits_after("tenant-a")
    assert hits_after("tenant-b") == first
    assert hits_after("tenant-a") > first


def test_bench_serve_cli(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench", "serve", "--base-url", server.url, "--model", MODEL, "--num-prompts", "12",
        "--input-len", "20", "--output-len", "6", "--request-rate", "30", "--tenants", "a,b",
        "--goodput", "ttft:60000", "--result-json", str(out), "--plots", str(tmp_path / "plots"), "--no-progress",
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Output token throughput" in result.stdout
    rep = json.loads(out.read_text())
    assert rep["completed"] == 12 and rep["failed"] == 0
    assert rep["total_output_tokens"] == 12 * 6
    assert set(rep["per_tenant"]) == {"a", "b"}
    assert rep["summary"]["goodput"] == pytest.approx(rep["summary"]["request_throughput"])
    assert (tmp_path / "plots" / "latency_cdf.png").is_file()
