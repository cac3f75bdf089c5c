"""Workloads: arrival processes, length distributions, named presets, and a trace file format.

Trace format (CSV with a header, or JSONL with one object per line), one request per row:
  prompt_len   (or num_prefill_tokens)  prompt tokens                       required
  output_len   (or num_decode_tokens)   output tokens: where the model      required
                                        emits EOS (the true length)
  arrival      (or arrived_at)          seconds from the start              optional: drawn when absent
  max_tokens                            the client's max_tokens             optional: absent = none set
  prefix_group, prefix_len              requests of one group share their   optional
                                        first prefix_len prompt tokens
                                        (e.g. a system prompt)
  tenant (or user), priority, deadline (seconds after arrival), slo_class, session_id   optional
A request's session_id also shares tokens: its prompt is the start of its session's token stream, so a
later turn with a longer prompt extends the earlier turns' prompts (prefix-cache hits, as in a chat).
A max_tokens below output_len cuts the output: the request stops at max_tokens (finish reason
"length") and metrics see the shorter output.
  hash_ids (JSON list of ints)          the prompt's blocks of HASH_BLOCK_TOKENS   optional
                                        tokens, by id: requests share a block where
                                        they share its id and every id before it
The public traces in ../shared/traces/ read as they are, and so do these public formats, told apart by
their columns (extra columns are ignored):
  Azure LLM inference 2023/2024   TIMESTAMP (a date and time), ContextTokens, GeneratedTokens
  BurstGPT                        Timestamp (seconds), Request tokens, Response tokens
  Mooncake (JSONL)                timestamp (milliseconds), input_length, output_length, hash_ids
Files are read as downloaded: gzip-compressed or not (told by their first bytes; trace.csv.gz is a CSV),
and a .json file holds JSON lines or one JSON list of rows. Absolute timestamps count from the earliest
one. A request that generated 0 tokens (a trace's failed or cancelled requests) is served as one that
generated 1, the token its prefill makes: its prompt's cost stays in the load (`read_trace` counts them in
`TraceInfo.zero_outputs`). A public format's row with 0 prompt tokens has nothing to serve and is left out
(`TraceInfo.empty_prompts`); in quanta's own columns it is an error.
"""

from __future__ import annotations

import csv
import functools
import gzip
import heapq
import itertools
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import numpy as np

from quanta.request import Request
from quanta.sampling_params import SamplingParams

_Z90 = 1.2815515655446004  # standard normal 90th percentile


@dataclass(slots=True)
class WorkloadRequest:
    arrival: float
    prompt_len: int
    output_len: int
    tenant: str = "default"
    priority: int = 0
    deadline: float | None = None  # seconds after arrival
    session_id: str | None = None
    slo_class: str | None = None  # TTFT/TPOT targets by name (the deadline policy's slo_classes)
    max_tokens: int | None = None  # what the client asked for (None: not set), not the true length
    prefix_group: str | None = None  # requests of one group share their first prefix_len prompt tokens
    prefix_len: int = 0
    # The prompt's blocks of HASH_BLOCK_TOKENS tokens by id (a Mooncake trace's hash_ids): a block's tokens
    # are its id's, so requests share a block where they share its id and every id before it.
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Token counts: 'lognormal' (median, p90), 'uniform' [low, high], or 'zipf' (exponent a on [low, high])."""

    kind: str
    a: float
    b: float
    low: int = 1
    high: int = 1 << 20

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "lognormal":
            median, p90 = self.a, self.b
            sigma = math.log(p90 / median) / _Z90
            x = rng.lognormal(math.log(median), sigma, n)
        elif self.kind == "uniform":
            x = rng.integers(int(self.a), int(self.b) + 1, n)
        elif self.kind == "zipf":
            # Bounded Zipf over [low, high]: P(k) proportional to k^-a, sampled through the CDF.
            ks = np.arange(self.low, self.high + 1)
            w = ks.astype(float) ** -self.a
            x = ks[np.searchsorted(np.cumsum(w) / w.sum(), rng.random(n), side="right").clip(max=len(ks) - 1)]
        else:
            raise ValueError(f"unknown length distribution {self.kind!r}")
        return np.clip(np.rint(x), self.low, self.high).astype(int)


# Lognormal fits to published medians and 90th percentiles (see ../shared/specs and traces/README.md).
PRESETS: dict[str, tuple[LengthDist, LengthDist]] = {
    "sharegpt": (
        LengthDist("lognormal", 1730, 5696, high=8192),
        LengthDist("lognormal", 415, 834, high=8192),
    ),
    "arxiv": (LengthDist("lognormal", 7059, 12985, high=32768), LengthDist("lognormal", 208, 371, high=8192)),
    "azure-conv": (
        LengthDist("lognormal", 1020, 2734.5, high=8192),
        LengthDist("lognormal", 129, 424, high=8192),
    ),
}


def poisson_arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return gamma_arrivals(rate, 1.0, n, rng)


def gamma_arrivals(rate: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Inter-arrival gaps ~ Gamma with mean 1/rate and coefficient of variation cv (cv=1: Poisson)."""
    if not (0 < rate < math.inf and 0 < cv < math.inf):  # also refuses nan
        raise ValueError("rate and cv must be positive, finite numbers")
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    return np.cumsum(gaps) - gaps[0]  # the first request arrives at t=0


def synthetic(
    n: int,
    prompt: LengthDist,
    output: LengthDist,
    rate: float | None = None,
    cv: float = 1.0,
    seed: int = 0,
    max_total: int | None = None,
) -> list[WorkloadRequest]:
    rng = np.random.default_rng(seed)
    p, o = prompt.sample(rng, n), output.sample(rng, n)
    if max_total is not None:  # keep prompt + output within the context, shortening the output first
        o = np.minimum(o, np.maximum(max_total - p, 1))
        p = np.minimum(p, max_total - 1)
    arrivals = gamma_arrivals(rate, cv, n, rng) if rate else np.zeros(n)
    return [WorkloadRequest(float(a), int(x), int(y)) for a, x, y in zip(arrivals, p, o)]


def shared_prefix_batch(
    num_groups: int,
    group_size: int,
    prefix: LengthDist,
    suffix: LengthDist,
    output: LengthDist,
    seed: int = 0,
    shuffle: bool = True,
) -> list[WorkloadRequest]:
    """An offline batch (all arrive at t=0): `num_groups` groups of `group_size` prompts, each group's
    prompts starting with the group's prefix (one prefix length drawn per group) and going on with a
    suffix of their own; shuffled, as a user's file rarely comes sorted. max_tokens is the output length
    (batch jobs set it; a policy may project KV growth from it)."""
    if num_groups < 1 or group_size < 1:
        raise ValueError("num_groups and group_size must be at least 1")
    rng = np.random.default_rng(seed)
    prefixes = prefix.sample(rng, num_groups)
    n = num_groups * group_size
    suffixes, outputs = suffix.sample(rng, n), output.sample(rng, n)
    reqs = []
    for i in range(n):
        g = i // group_size
        p = int(prefixes[g])
        reqs.append(
            WorkloadRequest(
                0.0,
                p + int(suffixes[i]),
                int(outputs[i]),
                max_tokens=int(outputs[i]),
                prefix_group=f"g{g}",
                prefix_len=p,
            )
        )
    if shuffle:
        reqs = [reqs[i] for i in rng.permutation(n)]
    return reqs


def preset(
    name: str, n: int, rate: float | None, cv: float = 1.0, seed: int = 0, max_total: int | None = None
) -> list[WorkloadRequest]:
    try:
        prompt, output = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown workload preset {name!r}; choose from {', '.join(PRESETS)}") from None
    return synthetic(n, prompt, output, rate, cv, seed, max_total)


_ALIASES = {
    "num_prefill_tokens": "prompt_len",
    "num_decode_tokens": "output_len",
    "arrived_at": "arrival",
    "user": "tenant",
}
# Tokens per hash id in a Mooncake trace (its block size).
HASH_BLOCK_TOKENS = 512


@dataclass(frozen=True, slots=True)
class _Format:
    """A public trace format: its column names (by what they hold), and its arrival column's unit."""

    name: str
    prompt_len: str
    output_len: str
    arrival: str
    time_unit: str  # "s", "ms", or "datetime" (absolute: counted from the earliest)


_FORMATS = (
    _Format("Azure LLM inference", "ContextTokens", "GeneratedTokens", "TIMESTAMP", "datetime"),
    _Format("BurstGPT", "Request tokens", "Response tokens", "Timestamp", "s"),
    _Format("Mooncake", "input_length", "output_length", "timestamp", "ms"),
)


@dataclass(slots=True)
class TraceInfo:
    """What reading a trace file found beside its requests."""

    format: str = "quanta"  # or the public format's name (_FORMATS)
    zero_outputs: int = 0  # requests with 0 output tokens in the file, served as 1
    empty_prompts: int = 0  # rows of a public format with 0 prompt tokens (nothing to serve): left out


def _format_of(columns: Sequence[str]) -> _Format | None:
    return next((f for f in _FORMATS if f.prompt_len in columns and f.output_len in columns), None)


def _names(fmt: _Format | None) -> dict[str, str]:
    """Column name -> quanta's name, for a file of this format (None: quanta's own, with its aliases)."""
    if fmt is None:
        return _ALIASES
    # A public format's names replace quanta's aliases: Mooncake's "timestamp" is its arrival.
    return {**_ALIASES, fmt.prompt_len: "prompt_len", fmt.output_len: "output_len", fmt.arrival: "arrival"}


def _seconds(v: object, unit: str) -> float:
    if unit == "datetime":
        if not isinstance(v, str):
            raise ValueError(f"{v!r} is not a date and time")
        t = _datetime(v)
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()  # no local clock changes
    x = _float(v)
    return x / 1000.0 if unit == "ms" else x


_FRACTION = re.compile(r"\.(\d+)")


def _datetime(v: str) -> datetime:
    try:
        return datetime.fromisoformat(v)  # Python 3.11 on: Azure's 7 fractional digits, a "Z", as written
    except ValueError:
        pass
    # Python 3.10 reads 3 or 6 fractional digits and no "Z": 100 ns digits (Azure's) cut to microseconds,
    # a few padded, and "Z" as +00:00.
    s = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), v.strip(), count=1)
    s = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"{v!r} is not a date and time (YYYY-MM-DD HH:MM:SS[.fff])") from None


def _int(v: object) -> int:
    """Integers as tables write them: "12", or "12.0" from a column that also has missing values."""
    if type(v) is str and v.isdecimal():  # the common cell, read without a float between (a million rows)
        return int(v)
    x = _float(v)
    if x != int(x):
        raise ValueError(f"{v!r} is not a whole number")
    return int(x)


def _float(v: object) -> float:
    """A finite number (a cell of "nan" or "inf" is an error, not a value)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"{v!r} is not a number")
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(f"{v!r} is not a finite number")
    return x


_OPTIONAL_COLUMNS: dict[str, Callable[[object], object]] = {
    "tenant": str,
    "priority": _int,
    "deadline": _float,
    "session_id": str,
    "slo_class": str,
    "max_tokens": _int,
    "prefix_group": str,
    "prefix_len": _int,
}


def _hash_ids(v: object) -> tuple[int, ...]:
    """A JSON list of ints (a CSV cell holds its text). Ids written as strings of digits ("17", as tools
    that keep 64-bit hashes exact write them) are those ints: an id only names a block."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise ValueError(f"hash_ids {_short(v)} is not a JSON list of integers") from None
    if not isinstance(v, list):
        raise ValueError(f"hash_ids {_short(v)} is not a list of integers")
    ids = []
    for x in v:
        if isinstance(x, str) and x.strip().lstrip("-").isdecimal():
            x = int(x)
        if not isinstance(x, int) or isinstance(x, bool):
            raise ValueError(f"hash_ids {_short(v)} is not a list of integers ({x!r})")
        ids.append(x)
    return tuple(ids)


def _short(v: object, limit: int = 80) -> str:
    """repr(v), cut: a message about a row of a thousand hash ids stays one readable line."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 5] + " ...]"


def _parse_row(raw: dict, where: str, time_unit: str = "s", names: dict[str, str] = _ALIASES) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a request must be an object of named fields, not {type(raw).__name__}")
    row = {names.get(k, k): v for k, v in raw.items() if v not in (None, "")}
    try:
        out = {"prompt_len": _int(row["prompt_len"]), "output_len": _int(row["output_len"])}
        if "arrival" in row:
            out["arrival"] = _seconds(row["arrival"], time_unit)
        if "hash_ids" in row and (ids := _hash_ids(row["hash_ids"])):
            out["hash_ids"] = ids
        for key, v in row.items():  # the row's few columns, not every optional one, for each row
            cast = _OPTIONAL_COLUMNS.get(key)
            if cast is not None:
                out[key] = cast(v)
    except KeyError as e:
        raise ValueError(f"{where}: missing column {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    if out["prompt_len"] < (0 if names is not _ALIASES else 1) or out["output_len"] < 0:
        raise ValueError(f"{where}: prompt_len must be at least 1 and output_len at least 0")
    if out.get("max_tokens", 1) < 1:
        raise ValueError(f"{where}: max_tokens must be at least 1")
    prefix_len = out.get("prefix_len", 0)
    if not 0 <= prefix_len <= out["prompt_len"]:
        raise ValueError(f"{where}: prefix_len must be between 0 and prompt_len")
    if prefix_len and "prefix_group" not in out:
        raise ValueError(f"{where}: prefix_len needs a prefix_group (who shares the prefix)")
    if out.get("deadline", 1.0) <= 0:
        raise ValueError(f"{where}: deadline (seconds after arrival) must be positive")
    if "hash_ids" in out:
        if prefix_len or "session_id" in out:
            raise ValueError(
                f"{where}: hash_ids say which blocks are shared: no prefix_group or session_id beside"
            )
        if out["prompt_len"] > len(out["hash_ids"]) * HASH_BLOCK_TOKENS:
            raise ValueError(
                f"{where}: {len(out['hash_ids'])} hash_ids cover at most "
                f"{len(out['hash_ids']) * HASH_BLOCK_TOKENS} prompt tokens, not {out['prompt_len']}"
            )
    return out


def read_trace(
    path: str | Path,
    rate: float | None = None,
    cv: float = 1.0,
    seed: int = 0,
    info: TraceInfo | None = None,
    num_requests: int | None = None,
    duration: float | None = None,
) -> list[WorkloadRequest]:
    """Read a CSV/JSONL trace (quanta's columns or a public format's, see the module's docstring), gzip-
    compressed or not (as traces are downloaded: .csv.gz, .jsonl.gz). Rows without arrival times get
    arrivals drawn at `rate` (required then). `info`, when given, is filled with what was found beside the
    requests (the format, zero-token outputs). `num_requests` and `duration` return `head(trace,
    num_requests, duration)`, keeping no more while reading than that head needs, whatever the rows'
    order (every row is still checked)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {str(path)!r} does not exist")
    _check_head(num_requests, duration)
    info = TraceInfo() if info is None else info
    info.empty_prompts = 0
    kept = _Head(num_requests, duration)
    gz = is_gzip(path)
    try:
        with open_text(path, gz) as f:
            columns, raws = _raw_rows(f, path)
            fmt = _format_of(columns)
            _check_columns(path, columns, fmt)
            unit = "s" if fmt is None else fmt.time_unit
            names = _names(fmt)
            # Parsed as read: a million-row trace never holds its text rows and its requests at once, nor
            # a week-long one the week when its first hour is asked for.
            for r, where in raws:
                req = _request(_parse_row(r, where, unit, names))  # type: ignore[arg-type]
                if req.prompt_len > 0:  # only a public format's rows may have none (_parse_row)
                    kept.add(req)
                else:
                    info.empty_prompts += 1
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"trace {str(path)!r} is not a CSV or JSONL text file ({e})") from None
    except (OSError, EOFError, zlib.error) as e:
        if not gz:
            raise
        raise ValueError(f"trace {str(path)!r}: a damaged gzip file ({e})") from None
    reqs = kept.requests()
    if not reqs:
        empty = f" (its {info.empty_prompts} rows have 0 prompt tokens)" if info.empty_prompts else ""
        raise ValueError(f"trace {str(path)!r} has no requests{empty}")
    info.format = "quanta" if fmt is None else fmt.name
    if kept.first_untimed is None:
        if unit == "datetime":  # absolute times: from the earliest (always kept)
            t0 = min(r.arrival for r in reqs)
            for r in reqs:
                r.arrival -= t0
    else:
        if kept.num_timed:  # a gap in the arrival column: an error, not a reason to redraw every arrival
            k = kept.first_untimed
            raise ValueError(f"trace {str(path)!r}: request {k + 1} has no arrival time (the others have)")
        if rate is None:
            raise ValueError(f"trace {str(path)!r} has no arrival times: give a request rate")
        arrivals = gamma_arrivals(rate, cv, len(reqs), np.random.default_rng(seed))
        for r, a in zip(reqs, arrivals):
            r.arrival = float(a)
    reqs = head(reqs, num_requests, duration)
    info.zero_outputs = 0
    for r in reqs:
        if r.output_len == 0:
            r.output_len = 1  # its prefill still ran, and made a token
            info.zero_outputs += 1
    return reqs


def _request(row: dict) -> WorkloadRequest:
    row.setdefault("arrival", math.nan)  # none in the file: drawn at the rate, or an error (read_trace)
    return WorkloadRequest(**row)


_GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Path) -> bool:
    """By its first bytes, not its name: a downloaded trace may be compressed under any name."""
    with path.open("rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_text(path: Path, gz: bool) -> TextIO:
    # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which would stick to the
    # first column's name. newline="": the csv module reads Windows line endings and quoted line breaks.
    if gz:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def format_suffix(path: Path) -> str:
    """The format's suffix, under a compression one: trace.jsonl.gz is JSONL."""
    return path.with_suffix("").suffix if path.suffix == ".gz" else path.suffix


def _raw_rows(f: TextIO, path: Path) -> tuple[list[str], Iterator[tuple[object, str]]]:
    """The file's columns (a CSV's header, or the first JSON row's keys) and its rows, each with where
    it is (file:line), read lazily."""
    suffix = format_suffix(path)
    if suffix in (".jsonl", ".json"):
        rows = _json_rows(f, path, whole_array=suffix == ".json")
        first = next(rows, None)
        if first is None:
            return [], iter(())
        return (list(first[0]) if isinstance(first[0], dict) else []), itertools.chain([first], rows)
    # A Mooncake-style hash_ids cell of a long prompt outgrows the csv module's 131,072-character default.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.DictReader(f)
    columns = list(reader.fieldnames or [])
    return columns, ((r, f"{path}:{reader.line_num}") for r in reader)


def _json_rows(f: TextIO, path: Path, whole_array: bool) -> Iterator[tuple[object, str]]:
    """One JSON object a line; a .json file may also be one JSON array of them (as a list is saved)."""
    lines: Iterable[str] = f
    if whole_array:
        text = f.read()
        if text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: {e}") from None
            if isinstance(data, list):
                yield from ((row, f"{path}: request {i}") for i, row in enumerate(data, 1))
                return
        lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield json.loads(line), f"{path}:{i}"
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON object a line ({e})") from None


def _check_columns(path: Path, columns: list[str], fmt: _Format | None) -> None:
    """A file with neither quanta's columns nor a public format's is no trace: say what is read, once,
    rather than 'missing column' on its first row."""
    if not columns or fmt is not None:
        return  # no rows (or JSON rows that are not objects): said below, with the row
    named = {_ALIASES.get(c, c) for c in columns}
    if "prompt_len" in named and "output_len" in named:
        return
    shown = ", ".join(repr(c) for c in columns[:6]) + (", ..." if len(columns) > 6 else "")
    raise ValueError(
        f"{path}: columns {shown} are no trace format quanta reads: prompt_len and output_len (or "
        "num_prefill_tokens, num_decode_tokens), Azure's ContextTokens and GeneratedTokens, BurstGPT's "
        "Request tokens and Response tokens, or Mooncake's input_length and output_length"
    )


def _check_head(num_requests: int | None, duration: float | None) -> None:
    if duration is not None and not duration > 0:  # also refuses nan
        raise ValueError("duration must be positive")
    if num_requests is not None and num_requests < 1:
        raise ValueError("num_requests must be at least 1")


def head(
    reqs: Sequence[WorkloadRequest], num_requests: int | None = None, duration: float | None = None
) -> list[WorkloadRequest]:
    """The start of a trace (in arrival order, ties in the given order): requests arriving within `duration`
    seconds of the first arrival, and at most `num_requests` of them; None: no limit (the whole trace)."""
    _check_head(num_requests, duration)
    out = sorted(reqs, key=lambda r: r.arrival)
    if duration is not None and out:
        end = out[0].arrival + duration
        out = [r for r in out if r.arrival < end]
    if num_requests is not None:
        out = out[:num_requests]
    return out


@dataclass(slots=True)
class _Head:
    """What `head(requests, num_requests, duration)` can still return while requests stream in, in any
    order: the num_requests earliest so far (a heap), or those within `duration` of the earliest so far
    (pruned whenever the list doubles). The earliest request is always kept. Requests without an arrival
    (drawn after reading) are all kept."""

    num_requests: int | None
    duration: float | None
    _heap: list[tuple[float, int, WorkloadRequest]] = field(default_factory=list)  # (-arrival, -index, req)
    _kept: list[WorkloadRequest] = field(default_factory=list)
    _start: float = math.inf  # the earliest arrival so far (duration alone)
    _bound: int = 1024  # prune the kept list past this length
    count: int = 0  # requests added
    num_timed: int = 0
    first_untimed: int | None = None  # index of the first request without an arrival

    def add(self, req: WorkloadRequest) -> None:
        index, a = self.count, req.arrival
        self.count += 1
        if math.isnan(a):
            if self.first_untimed is None:
                self.first_untimed = index
            self._kept.append(req)
            return
        self.num_timed += 1
        if self.num_requests is None and self.duration is None:
            self._kept.append(req)
            return
        if self.num_requests is not None:  # (duration, if any, cuts these n at the end: head())
            item = (-a, -index, req)
            if len(self._heap) < self.num_requests:
                heapq.heappush(self._heap, item)
            elif item > self._heap[0]:  # earlier than the latest kept
                heapq.heapreplace(self._heap, item)
            return
        self._start = min(self._start, a)
        end = self._start + self.duration  # type: ignore[operator]
        if a < end:
            self._kept.append(req)
            if len(self._kept) > self._bound:
                self._kept = [r for r in self._kept if r.arrival < end]
                self._bound = max(1024, 2 * len(self._kept))

    def requests(self) -> list[WorkloadRequest]:
        """The kept requests, in the order they came (head() sorts them, ties in that order)."""
        if self._heap:
            return [r for _, _, r in sorted(self._heap, key=lambda item: -item[1])] + self._kept
        return self._kept


def write_trace(path: str | Path, reqs: Sequence[WorkloadRequest]) -> None:
    path = Path(path)
    rows = [{**asdict(r), "hash_ids": list(r.hash_ids) or None} for r in reqs]
    if path.suffix in (".jsonl", ".json"):
        path.write_text(
            "".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows)
        )
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {**r, "hash_ids": json.dumps(r["hash_ids"]) if r["hash_ids"] else None} for r in rows
        )


def scale_rate(reqs: Sequence[WorkloadRequest], factor: float) -> list[WorkloadRequest]:
    """The same trace played `factor` times faster."""
    return [replace(r, arrival=r.arrival / factor) for r in reqs]


# Synthetic token ids. SimExecutors sample token 0 (the default) or 1 (the tests' null engines) and end
# a request with EOS_TOKEN_ID; prompt ids lie in [_FIRST_PROMPT_ID, 2**20), so they are none of these.
EOS_TOKEN_ID = 2
_FIRST_PROMPT_ID = 3
_SPAN = 2**20 - _FIRST_PROMPT_ID  # streams (a trace's requests, groups, sessions) before two coincide
_STRIDE = 7919  # prime, coprime with _SPAN: streams 0 .. _SPAN - 1 start at distinct offsets


@functools.cache
def _ids() -> list[int]:
    """Every prompt id once, as int objects made once (38 MB): a prompt is slices of this list, not a
    million-token trace's worth of new ints (the largest cost of feeding a trace to the simulator)."""
    return list(range(_FIRST_PROMPT_ID, _FIRST_PROMPT_ID + _SPAN))


def _stream(key: int, start: int, stop: int) -> list[int]:
    """Tokens [start, stop) of token stream `key`. Two streams hold different ids at every position, so
    block hashes (a chain from the first token) never match between streams: sharing is only by key."""
    ids = _ids()
    pos, n = (key * _STRIDE + start) % _SPAN, stop - start
    out = ids[pos : pos + n]  # consecutive ids, wrapping around the range
    while len(out) < n:
        out += ids[: n - len(out)]
    return out


def prompt_token_ids(reqs: Sequence[WorkloadRequest]) -> list[list[int]]:
    """Synthetic prompts whose sharing is what the trace says: the first prefix_len tokens of a
    prefix_group's requests are the group's; the rest comes from the request's session stream (a
    session's prompts are prefixes of one stream), or from a stream of its own (no accidental sharing).
    A request with hash_ids is its blocks' tokens, each block's from its id's stream."""
    return list(_prompts(reqs))


def _prompts(reqs: Sequence[WorkloadRequest]) -> Iterator[list[int]]:
    keys: dict[tuple[str, str], int] = {}

    def key(kind: str, name: str) -> int:  # streams len(reqs), len(reqs) + 1, ... in order of appearance
        return keys.setdefault((kind, name), len(reqs) + len(keys))

    for i, w in enumerate(reqs):
        if w.hash_ids:  # block k holds positions [kB, (k+1)B) of its id's stream
            b = HASH_BLOCK_TOKENS
            ids: list[int] = []
            for k, h in enumerate(w.hash_ids[: -(-w.prompt_len // b)]):
                ids += _stream(key("block", str(h)), k * b, min((k + 1) * b, w.prompt_len))
            yield ids
            continue
        head: list[int] = []
        if w.prefix_group is not None:
            head = _stream(key("group", w.prefix_group), 0, min(w.prefix_len, w.prompt_len))
        shared = len(head)
        own = i if w.session_id is None else key("session", w.session_id)
        tail = _stream(own, shared, w.prompt_len)
        if head:
            head += tail
            yield head
        else:
            yield tail  # (no copy of a whole prompt, the bulk of feeding a trace)


def prompts_share_nothing(reqs: Sequence[WorkloadRequest]) -> bool:
    """Whether no two of these requests' synthetic prompts share a block of tokens: none belongs to a
    prefix group or a session or names its blocks (hash_ids), so each has a stream of its own (streams
    differ at every position)."""
    return len(reqs) <= _SPAN and all(
        w.prefix_group is None and w.session_id is None and not w.hash_ids for w in reqs
    )


def to_requests(
    reqs: Sequence[WorkloadRequest], prefix: str = "w", default_max_tokens: int | None = None
) -> list[Request]:
    """Engine requests as a client would send them: synthetic prompt ids (see `prompt_token_ids`), the
    trace's max_tokens or else `default_max_tokens` (None: up to the remaining context), and EOS_TOKEN_ID
    as their EOS. The true output lengths stay in the workload: a SimExecutor given them
    (`output_lengths`) emits EOS there, so policies see no more than on the server."""
    return list(iter_requests(reqs, prefix, default_max_tokens))


def iter_requests(
    reqs: Sequence[WorkloadRequest], prefix: str = "w", default_max_tokens: int | None = None
) -> Iterator[Request]:
    """`to_requests`, one at a time: a long trace's prompts need not all be in memory at once."""
    for i, (w, ids) in enumerate(zip(reqs, _prompts(reqs))):
        yield Request(
            f"{prefix}{i}",
            ids,
            SamplingParams(max_tokens=w.max_tokens if w.max_tokens is not None else default_max_tokens),
            arrival_time=w.arrival,
            tenant=w.tenant,
            priority=w.priority,
            deadline=None if w.deadline is None else w.arrival + w.deadline,
            session_id=w.session_id,
            slo_class=w.slo_class,
            eos_token_ids=(EOS_TOKEN_ID,),
        )


def output_lengths(reqs: Sequence[WorkloadRequest], prefix: str = "w") -> dict[str, int]:
    """Request id (as `to_requests` names them) -> true output length: what SimExecutor ends them at."""
    return {f"{prefix}{i}": w.output_len for i, w in enumerate(reqs)}
