"""Third-party OpenAI clients against a real quanta server (127.0.0.1): what their users do with it.

langchain-openai's ChatOpenAI (invoke, stream, batch) and litellm (completion, streaming, and the
context-window error its fallbacks key on) must see what the official `openai` client sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# litellm fetches a model price map from the network at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from server_harness import MODEL, InProcessServer

QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def srv(llama_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(llama_dir) as s:
        yield s


def reference(srv: InProcessServer, max_tokens: int = 12) -> str:
    """Greedy answer through the official client."""
    out = srv.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=max_tokens, temperature=0
    )
    return out.choices[0].message.content or ""


def test_langchain_chat_openai(srv: InProcessServer) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=srv.url + "/v1", api_key="none", temperature=0, max_tokens=12, max_retries=0
    )
    expected = reference(srv)
    assert expected
    answer = chat.invoke(QUESTION)
    assert answer.content == expected
    assert answer.usage_metadata["output_tokens"] == 12
    # Streaming: the chunks add up to the same text, and the role arrives with the first content.
    chunks = list(chat.stream(QUESTION))
    assert "".join(c.content for c in chunks) == expected
    assert [a.content for a in chat.batch([QUESTION, QUESTION])] == [expected, expected]
    assert srv.http("GET", "/internal/state")[1]["num_running"] == 0


def test_litellm_completion_stream_and_context_window_error(srv: InProcessServer) -> None:
    litellm = pytest.importorskip("litellm")
    common = dict(model=f"openai/{MODEL}", api_base=srv.url + "/v1", api_key="none", num_retries=0)
    expected = reference(srv)
    out = litellm.completion(messages=QUESTION, max_tokens=12, temperature=0, **common)
    assert out.choices[0].message.content == expected
    assert out.usage.completion_tokens == 12
    stream = litellm.completion(messages=QUESTION, max_tokens=12, temperature=0, stream=True, **common)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    # A prompt over the context: litellm must recognise the error (its context-window fallbacks key on
    # this exception), which takes vLLM's wording.
    too_long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(messages=too_long, max_tokens=8, **common)
    # A prompt that fits with max_tokens trimmed to the context is served, as vLLM does.
    fits = [{"role": "user", "content": "word " * 20}]
    out = litellm.completion(messages=fits, max_tokens=10_000, temperature=0, **common)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens + out.usage.completion_tokens <= 256
