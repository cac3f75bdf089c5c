"""Workloads: arrival processes, length distributions, named presets, and a trace file format.

Trace format (CSV with a header, or JSONL with one object per line), one request per row:
  prompt_len   (or num_prefill_tokens)  prompt tokens                       required
  output_len   (or num_decode_tokens)   output tokens                       required
  arrival      (or arrived_at)          seconds from the start              optional: drawn when absent
  tenant (or user), priority, deadline (seconds after arrival), slo_class, session_id   optional
The public traces in ../shared/traces/ read as they are.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

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
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be positive")
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


def _parse_row(raw: dict, where: str) -> dict:
    row = {_ALIASES.get(k, k): v for k, v in raw.items() if v not in (None, "")}
    try:
        out = {"prompt_len": int(float(row["prompt_len"])), "output_len": int(float(row["output_len"]))}
        if "arrival" in row:
            out["arrival"] = float(row["arrival"])
        for key, cast in (
            ("tenant", str),
            ("priority", int),
            ("deadline", float),
            ("session_id", str),
            ("slo_class", str),
        ):
            if key in row:
                out[key] = cast(row[key])
    except KeyError as e:
        raise ValueError(f"{where}: missing column {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    if out["prompt_len"] < 1 or out["output_len"] < 1:
        raise ValueError(f"{where}: prompt_len and output_len must be at least 1")
    return out


def read_trace(
    path: str | Path, rate: float | None = None, cv: float = 1.0, seed: int = 0
) -> list[WorkloadRequest]:
    """Read a CSV/JSONL trace. Rows without arrival times get arrivals drawn at `rate` (required then)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {str(path)!r} does not exist")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(_parse_row(json.loads(line), f"{path}:{i}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: {e}") from None
    else:
        with path.open(newline="") as f:
            rows = [_parse_row(r, f"{path}:{i + 2}") for i, r in enumerate(csv.DictReader(f))]
    if not rows:
        raise ValueError(f"trace {str(path)!r} has no requests")
    if all("arrival" in r for r in rows):
        reqs = [WorkloadRequest(**r) for r in rows]
    else:
        if rate is None:
            raise ValueError(f"trace {str(path)!r} has no arrival times: give a request rate")
        arrivals = gamma_arrivals(rate, cv, len(rows), np.random.default_rng(seed))
        reqs = [WorkloadRequest(**{**r, "arrival": float(a)}) for r, a in zip(rows, arrivals)]
    return sorted(reqs, key=lambda r: r.arrival)


def write_trace(path: str | Path, reqs: Sequence[WorkloadRequest]) -> None:
    path = Path(path)
    rows = [asdict(r) for r in reqs]
    if path.suffix in (".jsonl", ".json"):
        path.write_text(
            "".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows)
        )
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def scale_rate(reqs: Sequence[WorkloadRequest], factor: float) -> list[WorkloadRequest]:
    """The same trace played `factor` times faster."""
    return [replace(r, arrival=r.arrival / factor) for r in reqs]


def to_requests(reqs: Sequence[WorkloadRequest], prefix: str = "w") -> list[Request]:
    """Engine requests with synthetic prompt ids, disjoint between requests (no accidental prefix sharing),
    and outputs forced to the trace's lengths."""
    out = []
    for i, w in enumerate(reqs):
        base = (i * 7919) % 1_000_000  # distinct first tokens; ids only matter for prefix hashing
        out.append(
            Request(
                f"{prefix}{i}",
                list(range(base, base + w.prompt_len)),
                SamplingParams(max_tokens=w.output_len, ignore_eos=True),
                arrival_time=w.arrival,
                tenant=w.tenant,
                priority=w.priority,
                deadline=None if w.deadline is None else w.arrival + w.deadline,
                session_id=w.session_id,
                slo_class=w.slo_class,
            )
        )
    return out
