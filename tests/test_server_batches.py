"""The Files and Batches APIs through the official `openai` client, on a real server (tiny random Llama):
the status lifecycle, results and errors files, cancelling, and a restart finishing an accepted batch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from server_harness import MODEL, InProcessServer

pytest.importorskip("openai")


def chat_line(cid: str, text: str, **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": 4,
            **body,
        },
    }


def jsonl(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def wait_batch(client, batch_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}"
        time.sleep(0.05)


def results(client, file_id: str | None) -> dict:
    if file_id is None:
        return {}
    rows = [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
    return {r["custom_id"]: r for r in rows}


SYSTEM = "Answer in one short sentence, please, and be precise about it. "


def test_batch_lifecycle_results_and_errors(llama_dir: Path, tmp_path: Path) -> None:
    rows = [chat_line(f"q{i}", SYSTEM + f"Question number {i}?") for i in range(6)]
    rows += [
        chat_line("hot", "x", temperature=5),  # the API's 400
        {
            "custom_id": "cmpl",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "hi"},
        },  # not this endpoint
        "{broken",
        chat_line("bias", "x", logit_bias={"100000": 5}),  # out of the vocabulary: the API's 400
        chat_line("gpt", "x", model="gpt-4"),  # not this server's model: the API's 404
    ]
    # A line that is not UTF-8 (a latin-1 e-acute): that line's error, the others still run.
    data = jsonl(rows) + b'{"custom_id": "latin", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "caf\xe9"}]}}\n'
    with InProcessServer(llama_dir, batch_dir=tmp_path / "store") as srv:
        client = srv.client()
        f = client.files.create(file=("in.jsonl", data), purpose="batch")
        assert f.purpose == "batch" and f.bytes == len(data)
        assert client.files.retrieve(f.id).filename == "in.jsonl"
        assert client.files.content(f.id).content == data
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert b.status in ("validating", "in_progress", "completed") and b.output_file_id is None
        b = wait_batch(client, b.id)
        assert b.status == "completed" and b.completed_at and b.in_progress_at and b.finalizing_at
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (12, 6, 6)
        out = results(client, b.output_file_id)
        assert set(out) == {f"q{i}" for i in range(6)}
        # The same answer as the interactive API gives.
        alone = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": SYSTEM + "Question number 3?"}],
            temperature=0,
            max_tokens=4,
        )
        body = out["q3"]["response"]["body"]
        assert out["q3"]["response"]["status_code"] == 200
        assert body["choices"][0]["message"]["content"] == alone.choices[0].message.content
        errors = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
        by_id = {e["custom_id"]: e for e in errors}
        assert by_id["hot"]["response"]["status_code"] == by_id["bias"]["response"]["status_code"] == 400
        assert by_id["gpt"]["response"]["status_code"] == 404
        assert "not this batch's endpoint" in by_id["cmpl"]["response"]["body"]["error"]["message"]
        bad_lines = {e["error"]["line"]: e["error"]["message"] for e in errors if e["custom_id"] is None}
        assert set(bad_lines) == {9, 12} and "not UTF-8" in bad_lines[12]
        listed = client.batches.list()
        assert [x.id for x in listed.data] == [b.id]
        status, payload, _ = srv.http("GET", "/v1/batches?limit=abc")  # the API's error shape, not FastAPI's
        assert status == 400 and payload["error"]["param"] == "limit", payload
        # Bad requests: unknown ids, a file that is not a batch input, no purpose.
        import openai

        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_" + "0" * 32)
        with pytest.raises(openai.BadRequestError):
            client.batches.create(
                input_file_id=b.output_file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        status, _, _ = srv.http(
            "POST", "/v1/files", b"x", {"Content-Type": "multipart/form-data; boundary=z"}
        )
        assert status == 401  # no Authorization header: not a form a web page could post
        assert client.files.delete(f.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(f.id)
        state = srv.wait_idle()
        assert state["num_free_blocks"] == state["num_blocks"]


def test_cancel_stops_the_batch_and_frees_its_requests(llama_dir: Path, tmp_path: Path) -> None:
    rows = [
        chat_line(f"q{i}", f"Tell me a long story number {i}.", max_tokens=64, ignore_eos=True)
        for i in range(40)
    ]
    with InProcessServer(
        llama_dir, engine_args={"max_num_seqs": 2}, batch_dir=tmp_path, batch_max_in_flight=4
    ) as srv:
        client = srv.client()
        f = client.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 30
        while client.batches.retrieve(b.id).request_counts.completed < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Batch requests are background work: at most batch_max_in_flight of them are in the engine, so
        # an interactive request waits for a few of them, not for the whole batch.
        hi = client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
        assert hi.choices[0].finish_reason in ("length", "stop")
        running = client.batches.retrieve(b.id)
        assert running.status == "in_progress" and running.request_counts.completed < 20
        c = client.batches.cancel(b.id)
        assert c.status in ("cancelling", "cancelled")
        b = wait_batch(client, b.id)
        assert b.status == "cancelled" and b.cancelled_at
        done = results(client, b.output_file_id)
        assert 1 <= len(done) < 40
        assert all(r["response"]["status_code"] == 200 for r in done.values())
        state = srv.wait_idle()  # the cancelled requests left the engine, their blocks free
        assert state["num_running"] == state["num_waiting"] == 0
        assert state["num_free_blocks"] == state["num_blocks"]
        # Interactive requests still run.
        ok = client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
        assert ok.choices[0].finish_reason in ("length", "stop")


def test_restart_finishes_an_accepted_batch(llama_dir: Path, tmp_path: Path) -> None:
    """A store as a server that stopped mid-batch leaves it: the batch in progress, one answer written.
    The next server goes on and answers only the rest."""
    from quanta.server.batches import BatchStore

    store = BatchStore(tmp_path)
    rows = [chat_line(f"q{i}", f"Question {i}?") for i in range(5)]
    inp = store.add_file(jsonl(rows), "in.jsonl", "batch")
    out = store.new_result_file("out.jsonl")
    err = store.new_result_file("err.jsonl")
    answered = {
        "id": "batch_req_x",
        "custom_id": "q2",
        "response": {"status_code": 200, "request_id": "r", "body": {"marker": 1}},
        "error": None,
    }
    store.content_path(out["id"]).write_text(json.dumps(answered) + "\n")
    batch_id = "batch_" + "1" * 32
    store.save_batch(
        {
            "id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
            "input_file_id": inp["id"], "completion_window": "24h", "status": "in_progress",
            "output_file_id": None, "error_file_id": None, "created_at": 1, "in_progress_at": 1,
            "expires_at": 86401, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 5, "completed": 1, "failed": 0}, "metadata": None,
            "_output": out["id"], "_error": err["id"],
        }
    )  # fmt: skip
    with InProcessServer(llama_dir, batch_dir=tmp_path) as srv:
        client = srv.client()
        b = wait_batch(client, batch_id)
        assert b.status == "completed"
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (5, 5, 0)
        lines = client.files.content(b.output_file_id).text.splitlines()
        assert len(lines) == 5 and json.loads(lines[0]) == answered  # q2 was not run again
        assert set(results(client, b.output_file_id)) == {f"q{i}" for i in range(5)}
