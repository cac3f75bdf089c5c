"""Real servers for the server tests: raw-HTTP and `openai` client helpers, and a server started in this
process (uvicorn on a background thread, 127.0.0.1, a port of its own) for options the command line does
not offer and for faults injected into the engine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny"


class ServerClient:
    """Helpers over `self.url` (http://127.0.0.1:PORT)."""

    url: str

    def client(self, api_key: str = "none", timeout: float = 60):  # -> openai.OpenAI
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def http(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        headers: dict | None = None,
        timeout: float = 60,
    ):
        """(status, parsed JSON or text, headers) of a raw request."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, hdrs = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, raw, hdrs = e.code, e.read(), e.headers
        try:
            return status, json.loads(raw), hdrs
        except json.JSONDecodeError:
            return status, raw.decode(), hdrs

    def sse(self, path: str, body: dict, headers: dict | None = None, timeout: float = 60) -> list[Any]:
        """The events of a streaming request: parsed JSON objects, and the string "[DONE]"."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST", headers=headers or {}
        )
        req.add_header("Content-Type", "application/json")
        events: list[Any] = []
        with urllib.request.urlopen(req, timeout=timeout) as r:
            assert r.status == 200
            for line in r:
                line = line.strip()
                if line.startswith(b"data: "):
                    data = line[len(b"data: ") :].decode()
                    events.append(data if data == "[DONE]" else json.loads(data))
        return events

    def state(self, headers: dict | None = None) -> dict:
        status, body, _ = self.http("GET", "/internal/state", headers=headers)
        assert status == 200, body
        return body

    def wait_idle(self, headers: dict | None = None, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state(headers)
            idle = (
                st["num_running"] == 0
                and st["num_waiting"] == 0
                and st["num_free_blocks"] == st["num_blocks"]
            )
            if idle or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def metrics(self) -> dict[tuple, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


class InProcessServer(ServerClient):
    """quanta's app served by uvicorn on a thread of this process; `engine` is the real LLMEngine, so a
    test can inject faults into it. Use as a context manager."""

    def __init__(self, model_dir: Path, engine_args: dict | None = None, **server_kwargs: Any) -> None:
        import uvicorn

        from quanta.engine.llm_engine import EngineArgs, LLMEngine
        from quanta.server.api_server import OpenAIServer

        args = dict(cpu_kernels=False, max_model_len=256, num_kv_blocks=512, check_integrity=True)
        self.engine = LLMEngine(EngineArgs(model=str(model_dir), **{**args, **(engine_args or {})}))
        self.server = OpenAIServer(self.engine, MODEL, **server_kwargs)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(self.server.app, log_level="warning", timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> InProcessServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(ServerClient):
    """`quanta serve` in a subprocess."""

    def __init__(self, model_dir: Path | None, *extra: str) -> None:
        """`model_dir` None: no --model and no --served-model-name (the default model)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model = ["--model", str(model_dir), "--served-model-name", MODEL] if model_dir is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quanta.cli", "serve", *model, "--port", str(self.port),
             "--num-kv-blocks", "512", "--max-model-len", "256", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "QUANTA_CPU_KERNELS": os.environ.get("QUANTA_CPU_KERNELS", "0")},
        )  # fmt: skip

    def wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
