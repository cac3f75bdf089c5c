"""ShareGPT-style conversation datasets, as vLLM's benchmarks read them: a JSON list (gzip-compressed or not)
of items holding "conversations" ([{"from", "value"}, ...]) or "messages" ([{"role", "content"}, ...]). An
item's first turn is a prompt and its second turn the answer, whose length in tokens is the output's.

`quanta bench serve` sends the prompts' text; `quanta simulate` replays their lengths. Both sample with
`sample_conversations`, so one seed picks the same conversations in the same order for both.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from quanta.sim.workload import format_suffix, is_gzip, open_text

CHARS_PER_TOKEN = 4  # the estimate where no tokenizer is given


def read_conversations(path: Path) -> list | None:
    """A .json (or .json.gz) file's conversations; None where it is no conversation file (a trace of
    lengths saved as .json: JSON lines, or a JSON list of requests, which read_trace reads, and says what
    is wrong)."""
    if format_suffix(path) != ".json" or not path.is_file():
        return None
    try:
        with open_text(path, is_gzip(path)) as f:
            data = json.load(f)
    except json.JSONDecodeError:
        return None  # JSON lines (or not JSON at all: read_trace says which line)
    except (UnicodeDecodeError, OSError, EOFError, zlib.error):
        return None  # binary or a damaged gzip file: read_trace says what it is
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    first = data[0] if data else None
    if isinstance(first, dict) and "conversations" not in first and "messages" not in first:
        return None
    return data


def sample_conversations(
    data: list,
    path: Path,
    n: int | None,
    tokenizer: Any | None,
    rng: np.random.Generator,
    output_len: int | None = None,
    max_len: int | None = None,
) -> list[tuple[str, int, int]]:
    """Up to n (all: None) (prompt, prompt tokens, output tokens) of the conversations, in a random order
    drawn from `rng`. Tokens are counted with `tokenizer` (a `tokenizers.Tokenizer`, as load_tokenizer
    gives), or estimated at CHARS_PER_TOKEN characters a token. `output_len` replaces the answers'
    lengths; with `max_len`, a conversation that does not fit is left out (as vLLM filters them), never
    cut."""
    rows: list[tuple[str, int, int]] = []
    pending: list[tuple[str, str]] = []  # candidates in order, counted a batch at a time

    def take() -> None:
        texts = [p for p, _ in pending] + [a for _, a in pending]
        if tokenizer is not None:  # in batches: the tokenizer counts them on every core
            counts = [len(e.ids) for e in tokenizer.encode_batch(texts)]
        else:
            counts = [len(t) // CHARS_PER_TOKEN for t in texts]
        for k, (prompt, _) in enumerate(pending):
            p_len, o_len = max(1, counts[k]), output_len or max(1, counts[len(pending) + k])
            if (max_len is None or p_len + o_len <= max_len) and len(rows) != n:
                rows.append((prompt, p_len, o_len))
        pending.clear()

    for i in rng.permutation(len(data)):
        item = data[int(i)]
        if not isinstance(item, dict):
            continue
        conv = item.get("conversations") or item.get("messages") or []
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, dict) for t in conv[:2]):
            continue
        prompt = conv[0].get("value", conv[0].get("content"))
        answer = conv[1].get("value", conv[1].get("content"))
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt:
            continue
        pending.append((prompt, answer))
        # A batch as large as what is still missing (some may not fit), within reason.
        if len(pending) >= min(max(64, (n or 1 << 30) - len(rows)), 2048):
            take()
            if len(rows) == n:
                break
    take()
    if not rows:
        raise ValueError(f"{path}: no usable conversations")
    return rows


def load_tokenizer(spec: str | Path) -> Any:
    """A `tokenizers.Tokenizer` from a model folder (its tokenizer.json), a tokenizer.json file, or a GGUF
    file (its vocabulary, through transformers' GGUF conversion). A one-line ValueError otherwise."""
    from tokenizers import Tokenizer

    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).backend_tokenizer
        except Exception as e:  # transformers raises many types for metadata it cannot convert
            raise ValueError(f"cannot read the tokenizer of GGUF file {str(path)!r}: {e}") from None
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"no tokenizer at {str(path)!r}: give a model folder with tokenizer.json, the file, or a GGUF"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own Exception subclass for a malformed file
        raise ValueError(f"cannot read tokenizer {str(file)!r}: {e}") from None
