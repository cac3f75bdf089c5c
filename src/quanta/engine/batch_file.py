"""`quanta run-batch`: an OpenAI batch input file (JSONL) through the engine, in one global plan.

Input lines: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}.
Output lines, written as each request finishes: {"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}. A body the API would refuse gets a 400 response on its line; a line that
is not a request at all (bad JSON, no custom_id, unknown url) gets an `error` (with its line number);
either way the rest of the file runs. Resumable: custom_ids (and bad lines) already in the output file
are skipped, and a line cut short by an interruption is dropped first.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from quanta.engine.core import StepFailedError
from quanta.engine.llm_engine import EngineFrontend
from quanta.engine.output import RequestOutput
from quanta.sampling_params import SamplingParams
from quanta.sched.batch_plan import plan_prompts
from quanta.server.protocol import ChatCompletionRequest, CompletionRequest

URLS = ("/v1/chat/completions", "/v1/completions")


class BadBody(ValueError):
    """The request is well formed but its body is refused (the API's 400)."""


class BadLine(ValueError):
    """The line is no request; `custom_id` is its custom_id when that much could be read."""

    def __init__(self, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.custom_id = custom_id


@dataclass(slots=True)
class BatchItem:
    line: int
    custom_id: str
    url: str
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    outputs: dict[int, RequestOutput] = field(default_factory=dict)


@dataclass(slots=True)
class BatchSummary:
    completed: int = 0  # requests answered 200
    failed: int = 0  # 400/500 responses and bad lines
    skipped: int = 0  # already in the output file


def answered(path: Path) -> tuple[set[str], set[int]]:
    """custom_ids and bad line numbers already answered in `path`; a torn last line is removed."""
    if not path.exists():
        return set(), set()
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # interrupted in the middle of a write
        lines.pop()
        path.write_text("".join(lines))
    ids: set[str] = set()
    bad_lines: set[int] = set()
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i}: not a batch output line; give another --output file") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: not a batch output line; give another --output file")
        if isinstance(row.get("custom_id"), str):
            ids.add(row["custom_id"])
        elif isinstance(row.get("error"), dict) and isinstance(row["error"].get("line"), int):
            bad_lines.add(row["error"]["line"])
    return ids, bad_lines


def parse_envelope(line: str, lineno: int) -> tuple[str, str, dict]:
    """(custom_id, url, body) of an input line, or BadLine saying why it is no request."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"line {lineno}: invalid JSON: {e}") from None
    if not isinstance(row, dict):
        raise BadLine(f"line {lineno}: expected a JSON object")
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(f"line {lineno}: missing custom_id (a non-empty string)")
    if row.get("method", "POST") != "POST":
        raise BadLine(f"line {lineno}: method must be POST", custom_id)
    url = row.get("url")
    if url not in URLS:
        raise BadLine(f"line {lineno}: url must be one of {', '.join(URLS)}, got {url!r}", custom_id)
    body = row.get("body")
    if not isinstance(body, dict):
        raise BadLine(f"line {lineno}: body must be a JSON object", custom_id)
    return custom_id, url, body


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def _parse_body(
    engine: EngineFrontend, url: str, body: dict
) -> tuple[str | None, list[list[int]], Callable[[list[int]], SamplingParams]]:
    """(model, prompt token ids, sampling params of a prompt) of a request body, or BadBody."""
    tok = engine.tokenizer
    if url == "/v1/chat/completions":
        chat = ChatCompletionRequest.model_validate(body)
        bad = chat.unsupported_field() or ("logprobs" if chat.logprobs else None)
        if bad:
            raise BadBody(f"{bad} is not supported")
        limit = engine.max_model_len
        chat.to_sampling_params(limit)  # validates before rendering
        text = tok.apply_chat_template(
            [m.as_template_dict() for m in chat.messages], *chat.template_options()
        )
        return (
            chat.model,
            [tok.encode(text, add_special_tokens=False)],
            lambda ids: chat.to_sampling_params(limit - len(ids)),
        )
    cmpl = CompletionRequest.model_validate(body)
    bad = cmpl.unsupported_field() or ("logprobs" if cmpl.logprobs is not None else None)
    bad = bad or ("echo" if cmpl.echo else None)
    if bad:
        raise BadBody(f"{bad} is not supported")
    cmpl.to_sampling_params()
    prompts = [tok.encode(p) if isinstance(p, str) else engine.to_token_ids(p)[1] for p in cmpl.prompts()]
    return cmpl.model, prompts, lambda ids: cmpl.to_sampling_params()


def build_request(
    engine: EngineFrontend, url: str, body: dict
) -> tuple[str | None, list[list[int]], list[SamplingParams]]:
    """(model, prompt token ids, sampling params) of a request body, or BadBody."""
    try:
        model, prompts, make = _parse_body(engine, url, body)
    except ValidationError as e:
        raise BadBody(_first_error(e)) from None
    except BadBody:
        raise
    except Exception as e:  # bad token ids, a template error: the line's fault, not the engine's
        raise BadBody(str(e)) from None
    limit = engine.max_model_len
    params = []
    for ids in prompts:
        if not ids:
            raise BadBody("prompt must contain at least one token")
        if len(ids) >= limit:
            raise BadBody(f"the prompt has {len(ids)} tokens; this model's maximum context length is {limit}")
        p = make(ids)
        try:
            engine.check_logit_bias(p)  # token ids past the vocabulary: the line's fault, as online (400)
        except ValueError as e:
            raise BadBody(str(e)) from None
        if p.max_tokens is None or len(ids) + p.max_tokens > limit:
            p.max_tokens = limit - len(ids)  # trimmed to the context, as the server does
            p.min_tokens = min(p.min_tokens, p.max_tokens)
        params.append(p)
    return model, prompts, params


def response_body(item: BatchItem, default_model: str) -> dict:
    outs = [item.outputs[k] for k in range(len(item.prompts))]
    completion = sum(len(o.token_ids) for out in outs for o in out.outputs)
    prompt = sum(len(p) for p in item.prompts)
    created = int(time.time())
    model = item.model or default_model
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if item.url == "/v1/chat/completions":
        choices = [
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": None,
                "finish_reason": o.finish_reason,
            }
            for o in outs[0].outputs
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
        }
    n = item.params[0].n
    choices = [
        {"index": k * n + o.index, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
        for k, out in enumerate(outs)
        for o in out.outputs
    ]
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def output_line(
    custom_id: str | None, status: int | None, body: dict | None, error: dict | None = None
) -> str:
    response = (
        None if status is None else {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}
    )
    row = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    return json.dumps(row) + "\n"


def error_body(message: str, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


def run_batch(
    engine: EngineFrontend,
    input_path: str | Path,
    output_path: str | Path,
    model_name: str,
    progress: bool | None = None,
) -> BatchSummary:
    """Run every request of `input_path` not yet answered in `output_path`, appending its answer there.
    All of them enter the engine at once, in the global plan's order (`batch_plan`), so the prefix cache
    serves shared prefixes whatever the policy; the `batch` policy also holds them and meters KV.
    `progress`: a bar (None: only on a terminal)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ValueError(f"input file {str(input_path)!r} does not exist")
    done_ids, done_lines = answered(output_path)
    summary = BatchSummary()
    with output_path.open("a") as out:
        items = read_input(engine, input_path, out, done_ids, done_lines, summary)
        out.flush()
        _run(engine, items, out, model_name, summary, progress)
    return summary


def read_input(
    engine: EngineFrontend,
    path: Path,
    out: TextIO,
    done_ids: set[str],
    done_lines: set[int],
    summary: BatchSummary,
    endpoint: str | None = None,
    model_name: str | None = None,
) -> list[BatchItem]:
    """The requests of the input file still to run; bad ones are answered in `out` at once. `endpoint`:
    the one url every line must name (a server batch is for one endpoint); `model_name`: the one model
    a line may name (a server's, as its online API checks)."""
    items: list[BatchItem] = []
    seen: set[str] = set()
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is that line's error, not the file's
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadLine(f"line {lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                custom_id, url, body = parse_envelope(line, lineno)
            except BadLine as e:
                if lineno in done_lines or e.custom_id in done_ids:
                    summary.skipped += 1
                else:
                    error = {"code": "invalid_line", "message": str(e), "line": lineno}
                    out.write(output_line(e.custom_id, None, None, error))
                    summary.failed += 1
                continue
            if custom_id in done_ids:
                summary.skipped += 1
                continue
            try:
                if endpoint is not None and url != endpoint:
                    raise BadBody(f"line {lineno}: url {url!r} is not this batch's endpoint {endpoint!r}")
                if custom_id in seen:
                    raise BadBody(f"line {lineno}: duplicate custom_id {custom_id!r}")
                seen.add(custom_id)
                model, prompts, params = build_request(engine, url, body)
            except BadBody as e:
                out.write(output_line(custom_id, 400, error_body(str(e))))
                summary.failed += 1
                continue
            if model_name is not None and model is not None and model != model_name:
                body_404 = error_body(f"the model {model!r} does not exist", "NotFoundError")
                out.write(output_line(custom_id, 404, body_404))
                summary.failed += 1
                continue
            items.append(BatchItem(lineno, custom_id, url, model or "", prompts, params))
    return items


def plan_order(items: list[BatchItem], block_size: int) -> list[tuple[BatchItem, int]]:
    """(item, prompt index) pairs in the global plan's order: prompts sharing a prefix back to back."""
    flat = [(item, k) for item in items for k in range(len(item.prompts))]
    expected = [item.params[k].max_tokens or 0 for item, k in flat]
    plan = plan_prompts([item.prompts[k] for item, k in flat], block_size, expected)
    return [flat[i] for i in plan.order]


def _run(
    engine: EngineFrontend,
    items: list[BatchItem],
    out: TextIO,
    model_name: str,
    summary: BatchSummary,
    progress: bool | None,
) -> None:
    from tqdm.auto import tqdm

    owner: dict[str, tuple[BatchItem, int]] = {}
    open_items = {id(item): item for item in items}
    for item, k in plan_order(items, engine.args.block_size):
        if id(item) not in open_items:
            continue
        request_id = f"{item.line}.{k}"
        try:
            engine.add_request(request_id, {"prompt_token_ids": item.prompts[k]}, item.params[k])
        except ValueError as e:  # the engine refuses it (checked here only): this line fails, not the run
            del open_items[id(item)]
            engine.abort_request([f"{item.line}.{j}" for j in range(len(item.prompts))])
            out.write(output_line(item.custom_id, 400, error_body(str(e))))
            summary.failed += 1
            continue
        owner[request_id] = (item, k)
    # disable=None: tqdm shows the bar only on a terminal.
    bar = tqdm(
        total=len(items),
        desc="Batch requests",
        unit="req",
        disable=None if progress is None else not progress,
    )
    try:
        while engine.has_unfinished_requests():
            try:
                finished = engine.step(only_finished=True)
            except StepFailedError as e:  # only that step's requests are lost; report them and go on
                for request_id in e.request_ids:
                    item, _ = owner[request_id]
                    if id(item) in open_items:
                        del open_items[id(item)]
                        engine.abort_request([f"{item.line}.{k}" for k in range(len(item.prompts))])
                        out.write(output_line(item.custom_id, 500, error_body(str(e), "internal_error")))
                        summary.failed += 1
                        bar.update(1)
                out.flush()
                continue
            for o in finished:
                item, k = owner[o.request_id]
                if id(item) not in open_items:
                    continue
                item.outputs[k] = o
                if len(item.outputs) == len(item.prompts):
                    del open_items[id(item)]
                    out.write(output_line(item.custom_id, 200, response_body(item, model_name)))
                    out.flush()  # each answer is on disk as soon as it is known: a rerun resumes after it
                    summary.completed += 1
                    bar.update(1)
    finally:
        bar.close()
        left = [f"{item.line}.{k}" for item in open_items.values() for k in range(len(item.prompts))]
        if left:  # interrupted: leave nothing running; their lines are not written, so a rerun does them
            engine.abort_request(left)
