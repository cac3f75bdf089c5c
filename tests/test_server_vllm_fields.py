"""vLLM's own request fields on the OpenAI server (real engine, real HTTP, the official `openai` client, the
fields sent through `extra_body` as vLLM's users send them): each is either applied as vLLM applies it or
refused with a 400 naming it, never silently ignored; and stream_options.continuous_usage_stats."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from server_harness import MODEL, InProcessServer  # noqa: E402

MESSAGES = [{"role": "user", "content": "hello there"}]
GREEDY = dict(model=MODEL, temperature=0.0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def srv(llama_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(llama_dir, trust_request_chat_template=True) as s:
        yield s


def _chat(client, **kw):
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    args = {**GREEDY, "messages": MESSAGES, **kw}
    args.pop("ignore_eos")
    return client.chat.completions.create(**args, extra_body=extra)


def _cmpl(client, **kw):
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    args = {**GREEDY, "prompt": "hello world", **kw}
    args.pop("ignore_eos")
    return client.completions.create(**args, extra_body=extra)


def test_unimplemented_vllm_fields_are_refused(srv: InProcessServer) -> None:
    client = srv.client()
    refused = [
        (_cmpl, {"allowed_token_ids": [5, 6, 7]}, "allowed_token_ids"),
        (_chat, {"allowed_token_ids": [5, 6, 7]}, "allowed_token_ids"),
        (_chat, {"bad_words": ["hello"]}, "bad_words"),
        (_cmpl, {"use_beam_search": True}, "use_beam_search"),
        (_chat, {"use_beam_search": True}, "use_beam_search"),
        (_chat, {"length_penalty": 0.5}, "length_penalty"),
        (_cmpl, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),  # as vLLM: not in streams
        (_cmpl, {"truncate_prompt_tokens": 100_000}, "truncate_prompt_tokens"),  # past max_model_len
        (_chat, {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ]
    for call, body, param in refused:
        with pytest.raises(openai.BadRequestError) as e:
            call(client, extra_body=body)
        assert e.value.body["param"] == param, (body, e.value.body)
    # Their vLLM defaults change nothing, so they are accepted.
    _chat(client, extra_body={"bad_words": [], "use_beam_search": False, "length_penalty": 1.0})


def test_prompt_logprobs(srv: InProcessServer) -> None:
    client = srv.client()
    status, tok, _ = srv.http("POST", "/tokenize", {"prompt": "hello world"})
    assert status == 200, tok
    ids = tok["tokens"]
    # Next to echo's logprobs, which score the same prompt tokens.
    out = _cmpl(client, max_tokens=1, echo=True, logprobs=1, extra_body={"prompt_logprobs": 2})
    choice = out.choices[0]
    plp = choice.prompt_logprobs
    assert len(plp) == len(ids) == out.usage.prompt_tokens and plp[0] is None
    for j, (t, entry) in enumerate(zip(ids[1:], plp[1:]), start=1):
        assert str(t) in entry and len(entry) <= 3  # the prompt token and the 2 most likely
        assert sorted(e["rank"] for k, e in entry.items() if k != str(t))[:2] == [1, 2][: len(entry) - 1]
        assert all(set(e) == {"logprob", "rank", "decoded_token"} for e in entry.values())
        assert entry[str(t)]["logprob"] == pytest.approx(choice.logprobs.token_logprobs[j], abs=1e-5)
    assert _cmpl(client).choices[0].prompt_logprobs is None  # vLLM's field, null unless asked for

    chat = _chat(client, max_tokens=1, extra_body={"prompt_logprobs": 0})
    plp = chat.prompt_logprobs  # top level in chat, as vLLM returns it
    assert len(plp) == chat.usage.prompt_tokens and plp[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["rank"] >= 1 for e in plp[1:])


def test_truncate_prompt_tokens_keeps_the_last_tokens(srv: InProcessServer) -> None:
    client = srv.client()
    ids = [70, 71, 72, 73, 74, 75, 76]
    cut = _cmpl(client, prompt=ids, echo=True, extra_body={"truncate_prompt_tokens": 3})
    assert cut.usage.prompt_tokens == 3
    same = _cmpl(client, prompt=ids[-3:], echo=True)
    assert cut.choices[0].text == same.choices[0].text

    text = "hello world foo bar baz"
    full = srv.http("POST", "/tokenize", {"prompt": text})[1]["tokens"]
    cut = _cmpl(client, prompt=text, extra_body={"truncate_prompt_tokens": 4})
    assert cut.usage.prompt_tokens == 4
    assert cut.choices[0].text == _cmpl(client, prompt=full[-4:]).choices[0].text
    assert _cmpl(client, prompt=text, extra_body={"truncate_prompt_tokens": -1}).usage.prompt_tokens == len(full)

    chat = _chat(client, extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5


def test_return_tokens_as_token_ids(srv: InProcessServer) -> None:
    client = srv.client()
    as_ids = {"return_tokens_as_token_ids": True}
    plain = _cmpl(client, logprobs=2).choices[0].logprobs
    ided = _cmpl(client, logprobs=2, extra_body=as_ids).choices[0].logprobs
    assert all(re.fullmatch(r"token_id:\d+", t) for t in ided.tokens)
    assert all(re.fullmatch(r"token_id:\d+", t) for top in ided.top_logprobs for t in top)
    assert ided.token_logprobs == plain.token_logprobs and ided.text_offset == plain.text_offset
    dec = [srv.http("POST", "/detokenize", {"tokens": [int(t[9:])]})[1]["prompt"] for t in ided.tokens]
    assert dec == plain.tokens

    plain = _chat(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    ided = _chat(client, logprobs=True, top_logprobs=2, extra_body=as_ids).choices[0].logprobs.content
    for p, i in zip(plain, ided, strict=True):
        assert re.fullmatch(r"token_id:\d+", i.token) and i.bytes == p.bytes and i.logprob == p.logprob
        assert all(re.fullmatch(r"token_id:\d+", t.token) for t in i.top_logprobs)


def test_chat_template_kwargs_and_documents(srv: InProcessServer) -> None:
    client = srv.client()
    template = (
        "{% for m in messages %}[{{ m.content }}]{% endfor %}{% if shout %}!{% endif %}"
        "{% for d in documents or [] %}<{{ d.title }}>{% endfor %}"
    )
    options = {
        "chat_template": template,
        "chat_template_kwargs": {"shout": True, "unused_by_the_template": 1},
        "documents": [{"title": "A", "text": "a"}, {"title": "B", "text": "b"}],
    }
    status, tok, _ = srv.http("POST", "/tokenize", {"messages": MESSAGES, **options})
    assert status == 200, tok
    assert srv.http("POST", "/detokenize", {"tokens": tok["tokens"]})[1]["prompt"] == "[hello there]!<A><B>"
    assert _chat(client, extra_body=options).usage.prompt_tokens == tok["count"]

    # chat_template_kwargs reach the model's own template too, over the request's other options.
    default = _chat(client).usage.prompt_tokens
    no_gen = _chat(client, extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert no_gen.usage.prompt_tokens < default

    # A server that does not trust request templates refuses them, as vLLM does without its flag.
    srv.server.trust_request_chat_template = False
    try:
        for body, param in (
            ({"chat_template": template}, "chat_template"),
            ({"chat_template_kwargs": {"chat_template": template}}, "chat_template_kwargs"),
        ):
            with pytest.raises(openai.BadRequestError) as e:
                _chat(client, extra_body=body)
            assert e.value.body["param"] == param
        assert _chat(client, extra_body={"chat_template_kwargs": {"shout": True}}).usage.prompt_tokens == default
    finally:
        srv.server.trust_request_chat_template = True


def test_continuous_usage_stats(srv: InProcessServer) -> None:
    client = srv.client()
    for create, kw in (
        (client.chat.completions.create, {"messages": MESSAGES, "n": 2}),
        (client.completions.create, {"prompt": ["hello world", "foo"], "n": 2}),
    ):
        args = {**GREEDY, **kw, "temperature": 1.0, "seed": 1, "max_tokens": 4}
        args.pop("ignore_eos")
        for options in (
            {"include_usage": True, "continuous_usage_stats": True},
            {"continuous_usage_stats": True},  # vLLM's include_usage defaults to true
        ):
            chunks = list(create(**args, stream=True, stream_options=options, extra_body={"ignore_eos": True}))
            *body, final = chunks
            assert final.choices == [] and final.usage.completion_tokens == 2 * len(kw.get("prompt", [0])) * 4
            assert len(body) > 2 and all(c.usage is not None for c in body)
            seen: dict[int, int] = {}
            for c in body:
                u = c.usage
                assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.prompt_tokens > 0
                for choice in c.choices:  # the running count of this chunk's choice
                    assert u.completion_tokens >= seen.get(choice.index, 0)
                    seen[choice.index] = u.completion_tokens
            assert all(v == 4 for v in seen.values()) and len(seen) == final.usage.completion_tokens // 4
        off = list(
            create(
                **args,
                stream=True,
                stream_options={"include_usage": False, "continuous_usage_stats": True},
                extra_body={"ignore_eos": True},
            )
        )
        assert all(c.usage is None for c in off)


def test_x_request_id_names_the_response_and_is_echoed(srv: InProcessServer) -> None:
    """vLLM builds the response id from a client's X-Request-Id; two requests may reuse one (the engine's
    own ids stay unique), and an implausible one (too long, odd characters) is replaced by a fresh id."""
    client = srv.client()
    raw = client.chat.completions.with_raw_response.create(
        **{k: v for k, v in GREEDY.items() if k != "ignore_eos"},
        messages=MESSAGES,
        extra_headers={"X-Request-Id": "trace-42"},
    )
    assert raw.headers["x-request-id"] == "trace-42"
    assert raw.parse().id == "chatcmpl-trace-42"
    again = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=2, extra_headers={"X-Request-Id": "trace-42"}
    )
    assert again.id == "cmpl-trace-42"
    stream = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=2, stream=True, extra_headers={"X-Request-Id": "trace-42"}
    )
    assert {c.id for c in stream} == {"cmpl-trace-42"}
    odd = client.completions.with_raw_response.create(
        model=MODEL, prompt="hello", max_tokens=2, extra_headers={"X-Request-Id": "a b\tc" + "x" * 200}
    )
    assert "x-request-id" not in odd.headers and re.fullmatch(r"cmpl-[0-9a-f]{32}", odd.parse().id)


def test_tools_with_tool_choice_none_are_rendered_and_answered_as_text(srv: InProcessServer) -> None:
    """As vLLM: tools sent with tool_choice "none" reach the chat template, and the answer is plain text;
    any other tool_choice still needs tool calling, which this server refuses."""
    client = srv.client()
    template = "{% if tools %}tools: {{ tools | length }} {% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    plain = _chat(client, extra_body={"chat_template": template})
    with_tools = _chat(client, tools=[tool, tool], tool_choice="none", extra_body={"chat_template": template})
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens  # "tools: 2 " rendered
    assert with_tools.choices[0].message.tool_calls is None
    assert with_tools.choices[0].finish_reason == "length"
    for choice in ({}, {"tool_choice": "auto"}):
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, tools=[tool], **choice)
        assert e.value.body["param"] == "tools"


def test_refused_sampling_settings_name_their_field(srv: InProcessServer) -> None:
    """A 400 for a sampling setting carries that setting in `param`, as OpenAI's errors do."""
    client = srv.client()
    cases = [
        (_chat, {"top_logprobs": 2}, {}, "top_logprobs"),  # without logprobs
        (_cmpl, {}, {"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        (_chat, {"stop": [""]}, {}, "stop"),
    ]
    for call, kw, extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            call(client, extra_body=extra, **kw)
        assert e.value.body["param"] == param, (kw, extra, e.value.body)
