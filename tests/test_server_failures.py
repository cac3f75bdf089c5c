"""The server under failure: a step the executor cannot run, an engine thread that dies, a huge prompt being
tokenized, an oversized body. Servers run in this process (real engine, real HTTP on 127.0.0.1) so that a
fault can be injected into the engine: a failing GPU step cannot be produced on a CPU, so the executor is
wrapped to raise when a chosen prompt token is in the step."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from server_harness import MODEL, InProcessServer  # noqa: E402

POISON = 499  # a prompt holding this token id makes the step fail (or the engine thread die)


def _wrap_execute(srv: InProcessServer, fault: Callable[[object], None]) -> None:
    """Run `fault(plan)` before each step's real execution."""
    executor = srv.engine.core.executor
    original = executor.execute

    def execute(plan):  # type: ignore[no-untyped-def]
        fault(plan)
        return original(plan)

    executor.execute = execute  # type: ignore[method-assign]


def _poisoned(requests) -> bool:  # type: ignore[no-untyped-def]
    return any(POISON in r.prompt_token_ids for r in requests)


def _slow_steps(plan) -> None:  # type: ignore[no-untyped-def]
    # Keeps long requests running while the test lines up others behind them; asserts nothing about time.
    time.sleep(0.01)


def _wait_state(srv: InProcessServer, pred: Callable[[dict], bool], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = srv.state()
        if pred(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.01)


def _assert_error(payload: dict, status: int) -> dict:
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], payload
    assert err["code"] == status
    return err


def test_a_failed_step_ends_only_its_requests(llama_dir: Path) -> None:
    with InProcessServer(llama_dir, engine_args={"max_num_seqs": 1}) as srv:

        def fault(plan) -> None:  # type: ignore[no-untyped-def]
            _slow_steps(plan)
            if _poisoned(s.request for s in plan.scheduled):
                raise RuntimeError("injected device fault")

        _wrap_execute(srv, fault)
        before = srv.metrics()
        client = srv.client()
        long_body = dict(model=MODEL, max_tokens=100, temperature=0, extra_body={"ignore_eos": True})
        # One request runs at a time: A runs; the poisoned P and P2 (n=2), then the healthy B, queue behind it.
        stream_a = iter(client.completions.create(prompt=[5, 6, 7], stream=True, **long_body))
        first = next(stream_a)
        with ThreadPoolExecutor(4) as pool:
            a = pool.submit(lambda: [first, *stream_a])
            p = pool.submit(
                srv.http, "POST", "/v1/completions", {"model": MODEL, "prompt": [POISON, 6], "max_tokens": 4}
            )
            _wait_state(srv, lambda st: st["num_waiting"] == 1)
            p2 = pool.submit(
                srv.sse,
                "/v1/completions",
                {"model": MODEL, "prompt": [POISON, 8], "max_tokens": 4, "n": 2, "stream": True},
            )
            _wait_state(srv, lambda st: st["num_waiting"] == 3)
            b = pool.submit(client.completions.create, prompt=[9, 10, 11], **{**long_body, "max_tokens": 8})
            _wait_state(srv, lambda st: st["num_waiting"] == 4)
            assert srv.state()["num_running"] == 1  # A was still running: everything above waited

            # A ran before the failures and B after them: both complete.
            chunks = a.result(timeout=60)
            assert sum(len(c.choices[0].text) > 0 for c in chunks) > 0
            assert chunks[-1].choices[0].finish_reason == "length"
            assert b.result(timeout=60).choices[0].finish_reason == "length"
            assert b.result().usage.completion_tokens == 8
            # P gets a JSON 500 (not plain text) ...
            status, payload, _ = p.result(timeout=60)
            assert status == 500
            err = _assert_error(payload, 500)
            assert err["type"] == "server_error" and "injected device fault" in err["message"]
            # ... and the streaming P2 an in-band error event, then [DONE].
            events = p2.result(timeout=60)
            assert events[-1] == "[DONE]"
            assert "injected device fault" in _assert_error(events[-2], 500)["message"]

        st = srv.wait_idle()
        assert st["integrity_ok"] and st["num_free_blocks"] == st["num_blocks"]  # nothing leaked
        assert srv.http("GET", "/health")[0] == 200
        assert client.completions.create(model=MODEL, prompt=[3, 4], max_tokens=2).choices  # serves on
        key = ("quanta:request_success_total", (("finished_reason", "error"), ("model_name", MODEL), ("tenant", "default")))  # fmt: skip
        assert srv.metrics()[key] - before.get(key, 0) == 3  # P and P2's two samples


def test_a_dead_engine_thread_fails_everything_fast(llama_dir: Path) -> None:
    with InProcessServer(llama_dir) as srv:
        _wrap_execute(srv, _slow_steps)

        def broken_observer(out) -> None:  # type: ignore[no-untyped-def]
            if _poisoned(out.updated):
                raise RuntimeError("observer bug")

        srv.engine.core.step_observers.append(broken_observer)  # escapes the step: kills the thread
        client = srv.client(timeout=30)  # liveness bound: nothing may hang
        body = dict(model=MODEL, max_tokens=200, temperature=0, extra_body={"ignore_eos": True})
        stream_a = iter(client.completions.create(prompt=[5, 6, 7], stream=True, **body))
        next(stream_a)
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(lambda: list(stream_a))
            b_body = {"model": MODEL, "prompt": [8, 9], "max_tokens": 200, "ignore_eos": True}
            b = pool.submit(srv.http, "POST", "/v1/completions", b_body)
            _wait_state(srv, lambda st: st["num_running"] == 2)

            status, payload, _ = srv.http("POST", "/v1/completions", {"model": MODEL, "prompt": [POISON, 5]})
            assert status == 503 and _assert_error(payload, 503)["type"] == "server_error"
            status, payload, _ = b.result(timeout=30)  # was running: fails at once, as JSON
            assert status == 503 and "observer bug" in _assert_error(payload, 503)["message"]
            with pytest.raises(openai.APIError, match="observer bug"):  # in-band error event
                a.result(timeout=30)

        status, payload, _ = srv.http("GET", "/health")
        assert status == 503
        status, payload, _ = srv.http("POST", "/v1/completions", {"model": MODEL, "prompt": "later"})
        assert status == 503 and _assert_error(payload, 503)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert srv.http("GET", "/internal/state")[0] == 503


def _raw_http(url: str, head: bytes, chunks: list[bytes]) -> tuple[int, bytes]:
    """Send a request by hand (a Content-Length that lies, or a chunked body); (status, body) of the reply."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except OSError:  # the server answered and closed before the whole body went out
            pass
        data = b""
        while True:
            got = s.recv(65536)
            data += got
            head_end = data.find(b"\r\n\r\n")
            if head_end != -1:
                length = re.search(rb"content-length: *(\d+)", data[:head_end], re.IGNORECASE)
                if length and len(data) >= head_end + 4 + int(length.group(1)):
                    break
            if not got:
                break
    status = int(data.split(b" ", 2)[1])
    return status, data[data.find(b"\r\n\r\n") + 4 :]


class _WatchedTokenizer:
    """The real `tokenizers` tokenizer, watched: `busy` is set while it encodes a long text."""

    def __init__(self, backend: object) -> None:
        self._backend = backend
        self.started, self.busy = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def _watch(self, texts: list[str]) -> Iterator[None]:
        long = any(isinstance(t, str) and len(t) > 1_000_000 for t in texts)
        if long:
            self.busy.set()
            self.started.set()
        try:
            yield
        finally:
            if long:
                self.busy.clear()

    def encode(self, text: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self._watch([text]):
            return self._backend.encode(text, *args, **kwargs)

    def encode_batch(self, texts: list[str], *args, **kwargs):  # type: ignore[no-untyped-def]
        with self._watch(texts):
            return self._backend.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._backend, name)


def test_big_prompts_do_not_block_the_server_and_big_bodies_get_413(llama_dir: Path) -> None:
    limit = 8 << 20
    with InProcessServer(llama_dir, max_request_bytes=limit) as srv:
        tokenizer = srv.engine.tokenizer.backend = _WatchedTokenizer(srv.engine.tokenizer.backend)
        words = ["the", "scheduler", "decides", "once", "upon", "a", "time", "kv", "cache", "block"]
        huge = " ".join(words[i % 7] + words[i % 10] for i in range(400_000))  # ~4 MB, under the limit
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(srv.http, "POST", "/v1/completions", {"model": MODEL, "prompt": huge})
            assert tokenizer.started.wait(60)
            # While it is being tokenized, the server answers (5 s: a generous liveness bound) ...
            assert srv.http("GET", "/health", timeout=5)[0] == 200
            assert tokenizer.busy.is_set()  # ... not only once the tokenizer let go of the interpreter
            text = "".join(
                c.choices[0].text
                for c in srv.client(timeout=30).completions.create(
                    model=MODEL, prompt="hi", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
                )
            )
            assert text
            status, payload, _ = big.result(timeout=120)
        assert status == 400 and _assert_error(payload, 400)["param"] == "prompt"  # longer than the context

        # Over the limit: refused from Content-Length before any of the body is read ...
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        status, reply = _raw_http(srv.url, head + b"Content-Length: %d\r\n\r\n" % (limit + 1), [])
        assert status == 413 and b'"code":413' in reply
        # ... or while reading a chunked body.
        body = b'{"model": "tiny", "prompt": "' + b"a" * (limit + 10) + b'"}'
        piece = 1 << 16
        chunks = [
            b"%x\r\n%s\r\n" % (len(body[i : i + piece]), body[i : i + piece])
            for i in range(0, len(body), piece)
        ]
        status, reply = _raw_http(
            srv.url, head + b"Transfer-Encoding: chunked\r\n\r\n", [*chunks, b"0\r\n\r\n"]
        )
        assert status == 413 and b"limit" in reply
        assert srv.client().completions.create(model=MODEL, prompt="still here", max_tokens=2).choices
        st = srv.wait_idle()
        assert st["integrity_ok"] and st["num_free_blocks"] == st["num_blocks"]


def test_unexpected_errors_are_json_500s(llama_dir: Path) -> None:
    with InProcessServer(llama_dir) as srv:

        def bug(*args: object) -> None:
            raise KeyError("some internal detail")

        srv.server._scheduling = bug  # type: ignore[method-assign]
        status, payload, _ = srv.http("POST", "/v1/completions", {"model": MODEL, "prompt": "hi"})
        assert status == 500
        err = _assert_error(payload, 500)
        assert err["type"] == "server_error" and "internal detail" not in err["message"]  # logged, not sent
        with pytest.raises(openai.InternalServerError):
            srv.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert srv.http("GET", "/health")[0] == 200
