"""OpenAI's Files and Batches APIs: uploaded batch files, batch jobs and their results, kept on disk so
that a restarted server finishes the batches it had accepted.

Layout under the batch directory: files/<id> (contents) with files/<id>.json (the file object), and
batches/<id>.json (the batch object; fields starting with "_" are internal). Results are appended to the
batch's output file (200s) and error file (the rest) as requests finish, so a restart skips the
custom_ids already answered (`batch_file.answered`).

Batch requests are background work: they enter the engine with the least important priority the server
allows (the `priority` policy serves interactive requests first) and at most `max_in_flight` at a time,
so a batch of thousands never queues ahead of interactive traffic under FCFS policies either. They are
submitted in the global prefix plan's order (`batch_plan`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from quanta.engine.batch_file import (
    BatchItem,
    BatchSummary,
    answered,
    error_body,
    output_line,
    plan_order,
    read_input,
    response_body,
)
from quanta.engine.llm_engine import EngineFrontend
from quanta.engine.output import RequestOutput
from quanta.server.async_engine import AsyncEngine, EngineDeadError, RequestStream

logger = logging.getLogger("quanta")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("failed", "completed", "expired", "cancelled")


def _write_json(path: Path, obj: dict) -> None:
    """Atomically: a crash leaves the old or the new object, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _public(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


class BatchStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self.batches = self.root / "batches"
        self.files.mkdir(parents=True, exist_ok=True)
        self.batches.mkdir(parents=True, exist_ok=True)

    # ---- files ------------------------------------------------------------------------------------
    def _meta(self, file_id: str) -> Path:
        if not file_id.startswith("file-") or not file_id[5:].isalnum():  # ids name paths: nothing else
            raise KeyError(file_id)
        return self.files / f"{file_id}.json"

    def content_path(self, file_id: str) -> Path:
        return self._meta(file_id).with_suffix("")

    def add_file(self, content: bytes, filename: str, purpose: str) -> dict:
        file_id = f"file-{uuid.uuid4().hex}"
        self.content_path(file_id).write_bytes(content)
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        _write_json(self._meta(file_id), obj)
        return obj

    def new_result_file(self, filename: str) -> dict:
        """An output or error file of a batch: empty now, appended to as results come."""
        return self.add_file(b"", filename, "batch_output")

    def refresh_size(self, file_id: str) -> None:
        obj = self.get_file(file_id)
        if obj is not None:
            obj["bytes"] = self.content_path(file_id).stat().st_size
            _write_json(self._meta(file_id), obj)

    def get_file(self, file_id: str) -> dict | None:
        try:
            return json.loads(self._meta(file_id).read_text())
        except (KeyError, FileNotFoundError):
            return None

    def list_files(self) -> list[dict]:
        objs = [json.loads(p.read_text()) for p in self.files.glob("file-*.json")]
        return sorted(objs, key=lambda o: o["created_at"], reverse=True)

    def delete_file(self, file_id: str) -> bool:
        if self.get_file(file_id) is None:
            return False
        self.content_path(file_id).unlink(missing_ok=True)
        self._meta(file_id).unlink()
        return True

    # ---- batches ----------------------------------------------------------------------------------
    def _batch_path(self, batch_id: str) -> Path:
        if not batch_id.startswith("batch_") or not batch_id[6:].isalnum():
            raise KeyError(batch_id)
        return self.batches / f"{batch_id}.json"

    def save_batch(self, batch: dict) -> None:
        _write_json(self._batch_path(batch["id"]), batch)

    def get_batch(self, batch_id: str) -> dict | None:
        try:
            return json.loads(self._batch_path(batch_id).read_text())
        except (KeyError, FileNotFoundError):
            return None

    def list_batches(self) -> list[dict]:
        objs = [json.loads(p.read_text()) for p in self.batches.glob("batch_*.json")]
        return sorted(objs, key=lambda o: (o["created_at"], o["id"]), reverse=True)


class BatchManager:
    """Runs accepted batches on the server's engine, one asyncio task per batch."""

    def __init__(
        self,
        store: BatchStore,
        engine: AsyncEngine,
        llm_engine: EngineFrontend,
        model_name: str,
        priority: int,
        max_in_flight: int = 64,
    ) -> None:
        assert max_in_flight >= 1
        self.store = store
        self.engine = engine
        self.llm_engine = llm_engine
        self.model_name = model_name
        self.priority = priority
        self.max_in_flight = max_in_flight
        self._tasks: dict[str, asyncio.Task] = {}
        self._items: dict[str, list[asyncio.Task]] = {}  # batch id -> the tasks of its requests

    def resume(self) -> None:
        """After a restart: go on with the batches that had not finished."""
        for batch in self.store.list_batches():
            if batch["status"] == "cancelling":
                self._set(batch, "cancelled")
            elif batch["status"] in ACTIVE:
                self._start(batch["id"])

    async def shutdown(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def create(self, input_file_id: str, endpoint: str, completion_window: str, metadata: Any) -> dict:
        """A new batch, or ValueError (the API's 400)."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        if completion_window != "24h":
            raise ValueError("completion_window must be '24h'")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError("metadata must be an object")
        file = self.store.get_file(input_file_id)
        if file is None or file["purpose"] != "batch":
            raise ValueError(f"no batch input file {input_file_id!r} (upload one with purpose 'batch')")
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex}"
        out = self.store.new_result_file(f"{batch_id}_output.jsonl")
        err = self.store.new_result_file(f"{batch_id}_error.jsonl")
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 24 * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
            "_output": out["id"],
            "_error": err["id"],
        }
        self.store.save_batch(batch)
        self._start(batch_id)
        return _public(batch)

    def get(self, batch_id: str) -> dict | None:
        batch = self.store.get_batch(batch_id)
        return None if batch is None else _public(batch)

    def page(self, limit: int, after: str | None) -> dict:
        batches = self.store.list_batches()
        if after is not None:
            ids = [b["id"] for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = [_public(b) for b in batches[:limit]]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(batches) > limit,
        }

    def cancel(self, batch_id: str) -> dict | None:
        batch = self.store.get_batch(batch_id)
        if batch is None:
            return None
        if batch["status"] in ("validating", "in_progress"):
            self._set(batch, "cancelling")
            for task in self._items.get(batch_id, ()):
                task.cancel()  # a cancelled stream aborts its request: the blocks are freed at once
        return _public(batch)

    # ---- running ------------------------------------------------------------------------------------
    def _set(self, batch: dict, status: str) -> None:
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())
        if status in ("completed", "cancelled", "failed"):
            for key, public in (("_output", "output_file_id"), ("_error", "error_file_id")):
                self.store.refresh_size(batch[key])
                if self.store.content_path(batch[key]).stat().st_size or key == "_output":
                    batch[public] = batch[key]
        self.store.save_batch(batch)

    def _cancelled(self, batch_id: str) -> bool:
        batch = self.store.get_batch(batch_id)
        return batch is None or batch["status"] == "cancelling"

    def _start(self, batch_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(batch_id))
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    async def _run(self, batch_id: str) -> None:
        batch = self.store.get_batch(batch_id)
        assert batch is not None
        out_path = self.store.content_path(batch["_output"])
        err_path = self.store.content_path(batch["_error"])
        try:
            done_ids, done_lines = answered(out_path)
            err_ids, err_lines = answered(err_path)
            summary = BatchSummary()
            with err_path.open("a") as err:
                # Tokenizing thousands of prompts is off the event loop.
                items = await asyncio.to_thread(
                    read_input,
                    self.llm_engine,
                    self.store.content_path(batch["input_file_id"]),
                    err,
                    done_ids | err_ids,
                    done_lines | err_lines,
                    summary,
                    batch["endpoint"],
                    self.model_name,
                )
            batch = self.store.get_batch(batch_id) or batch  # cancelled while validating?
            batch["request_counts"] = {
                "total": summary.skipped + summary.failed + len(items),
                "completed": len(done_ids),
                "failed": summary.skipped - len(done_ids) + summary.failed,
            }
            self.store.save_batch(batch)  # no await since the read: a cancel cannot come in between
            if batch["status"] == "validating":
                self._set(batch, "in_progress")
            if batch["status"] == "in_progress":
                await self._run_items(batch, items, out_path, err_path)
            batch = self.store.get_batch(batch_id) or batch
            if batch["status"] == "cancelling":
                self._set(batch, "cancelled")
            else:
                self._set(batch, "finalizing")
                self._set(batch, "completed")
        except asyncio.CancelledError:
            raise  # the server is stopping: the batch resumes at the next start
        except Exception as e:  # the engine died, the disk failed, a file went bad: never stuck in a state
            logger.error("batch %s failed", batch_id, exc_info=e)
            batch["errors"] = {"object": "list", "data": [{"code": "batch_failed", "message": str(e)}]}
            self._set(batch, "failed")
        finally:
            self._items.pop(batch_id, None)

    async def _run_items(self, batch: dict, items: list[BatchItem], out_path: Path, err_path: Path) -> None:
        batch_id = batch["id"]
        window = asyncio.Semaphore(self.max_in_flight)
        lines = dict.fromkeys(item.line for item, _ in plan_order(items, self.llm_engine.args.block_size))
        by_line = {item.line: item for item in items}
        counts = batch["request_counts"]
        with out_path.open("a") as out, err_path.open("a") as err:

            async def one(item: BatchItem) -> None:
                async with window:  # FIFO: items enter the engine in plan order
                    ids = [f"{batch_id}-{item.line}-{k}" for k in range(len(item.prompts))]
                    try:
                        added = await self.engine.add_many(
                            [
                                (rid, {"prompt_token_ids": p}, sp)
                                for rid, p, sp in zip(ids, item.prompts, item.params)
                            ],
                            tenant="batch",
                            priority=self.priority,
                        )
                        outs = await asyncio.gather(*(_final(s) for s in added))
                    except (EngineDeadError, asyncio.CancelledError):
                        raise
                    except ValueError as e:  # this request only, refused (as online: 400)
                        err.write(output_line(item.custom_id, 400, error_body(str(e))))
                        err.flush()
                        counts["failed"] += 1
                        return
                    except Exception as e:  # this request only: its engine step failed
                        err.write(output_line(item.custom_id, 500, error_body(str(e), "internal_error")))
                        err.flush()
                        counts["failed"] += 1
                        return
                    item.outputs = dict(enumerate(outs))
                    out.write(output_line(item.custom_id, 200, response_body(item, self.model_name)))
                    out.flush()  # on disk before it is counted: a restart skips exactly these
                    counts["completed"] += 1
                    current = self.store.get_batch(batch_id)
                    if current is not None and current["status"] == "in_progress":
                        current["request_counts"] = counts
                        self.store.save_batch(current)

            tasks = [asyncio.ensure_future(one(by_line[line])) for line in lines]
            self._items[batch_id] = tasks
            results = await asyncio.gather(*tasks, return_exceptions=True)
        dead = next((r for r in results if isinstance(r, EngineDeadError)), None)
        if dead is not None:
            raise dead
        fresh = self.store.get_batch(batch_id)
        if fresh is not None:
            fresh["request_counts"] = counts
            self.store.save_batch(fresh)


async def _final(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    if last is None or not last.finished:
        raise RuntimeError("the request ended without a result")
    return last


def parse_upload(content_type: str | None, body: bytes) -> tuple[str, bytes, str]:
    """(filename, content, purpose) of a multipart/form-data upload (fields `file` and `purpose`), as
    the OpenAI clients send it; ValueError when it is not one."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise ValueError("upload a file as multipart/form-data with fields 'file' and 'purpose'")
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not msg.is_multipart():
        raise ValueError("malformed multipart/form-data body")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    if "file" not in fields:
        raise ValueError("the upload has no 'file' field")
    purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
    if purpose != "batch":
        raise ValueError(f"purpose must be 'batch', got {purpose!r}")
    filename, content = fields["file"]
    return filename or "upload.jsonl", content, purpose
