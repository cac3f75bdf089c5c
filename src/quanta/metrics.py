"""Latency and throughput metrics from per-request clock readings, the same in engine, server and simulator.

Definitions follow vLLM's benchmarks: TTFT = first token - arrival; ITL/TBT = gaps between consecutive
tokens; TPOT = (finish - first token) / (outputs - 1); E2E = finish - arrival; scheduling delay =
first scheduled - arrival. Goodput counts requests that meet every given SLO.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from quanta.request import Request

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestMetrics:
    request_id: str
    tenant: str
    arrival: float
    num_prompt_tokens: int
    num_output_tokens: int
    ttft: float | None
    e2e: float | None
    tpot: float | None
    scheduling_delay: float | None
    itl: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    @classmethod
    def of(cls, req: Request, with_itl: bool = True) -> RequestMetrics:
        """`with_itl=False` leaves `itl` empty (MetricsStream.add_request takes it as an array instead)."""
        t = req.times
        ttft = None if t.first_token is None else t.first_token - t.arrival
        e2e = None if t.finished is None else t.finished - t.arrival
        n = len(t.tokens)
        tpot = (t.tokens[-1] - t.tokens[0]) / (n - 1) if n > 1 else None
        delay = None if t.first_scheduled is None else t.first_scheduled - t.arrival
        itl = [b - a for a, b in zip(t.tokens, t.tokens[1:])] if with_itl else []
        return cls(
            req.request_id,
            req.tenant,
            t.arrival,
            req.num_prompt_tokens,
            n,
            ttft,
            e2e,
            tpot,
            delay,
            itl,
            req.num_preemptions,
        )

    def meets(
        self, ttft_slo: float | None = None, tpot_slo: float | None = None, e2e_slo: float | None = None
    ) -> bool:
        # A one-token answer has no time between tokens to miss: it meets any TPOT target (as vLLM's
        # benchmark counts it, with TPOT 0).
        tpot = 0.0 if self.tpot is None else self.tpot
        checks = ((self.ttft, ttft_slo), (tpot, tpot_slo), (self.e2e, e2e_slo))
        return all(slo is None or (value is not None and value <= slo) for value, slo in checks)


def json_safe(obj: object) -> object:
    """`obj` with every non-finite float as null: JSON has no NaN (a percentile of no samples is one),
    and strict readers refuse the bare NaN that json.dumps writes."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def distribution(values: Iterable[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (NaN when there are no values)."""
    return _distribution(np.asarray(list(values), dtype=float))


def _distribution(arr: np.ndarray) -> dict[str, float]:
    if arr.size == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


class LogHistogram:
    """Counts of positive values in geometric bins (each `ratio` times the one below, from `low` up):
    fixed memory for any number of values. A quantile is read as its bin's geometric middle, within
    sqrt(ratio) - 1 (1% at the default 1.02) of the exact value, for values in [low, low * ratio**bins);
    the mean is exact."""

    def __init__(self, low: float = 1e-6, ratio: float = 1.02, num_bins: int = 1400) -> None:
        assert low > 0 and ratio > 1 and num_bins > 0
        self.low, self.ratio = low, ratio
        self._log_ratio = math.log(ratio)
        self.counts = np.zeros(num_bins, dtype=np.int64)
        self.count = 0
        self.total = 0.0

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        self.count += int(values.size)
        self.total += float(values.sum())
        # Values below `low` (and zeros) count in the first bin, values above the range in the last.
        idx = np.floor(np.log(np.maximum(values, self.low) / self.low) / self._log_ratio).astype(np.int64)
        self.counts += np.bincount(np.minimum(idx, self.counts.size - 1), minlength=self.counts.size)

    def merge(self, other: LogHistogram) -> None:
        assert (other.low, other.ratio, other.counts.size) == (self.low, self.ratio, self.counts.size)
        self.counts += other.counts
        self.count += other.count
        self.total += other.total

    def quantile(self, q: float) -> float:
        if self.count == 0:
            return float("nan")
        rank = q * (self.count - 1)  # as np.percentile ranks: 0 .. count - 1
        k = int(np.searchsorted(np.cumsum(self.counts), math.floor(rank) + 1))
        return self.low * self.ratio ** (k + 0.5)

    def distribution(self) -> dict[str, float]:
        if self.count == 0:
            return _distribution(np.empty(0))
        return {"mean": self.total / self.count, **{f"p{p}": self.quantile(p / 100) for p in PERCENTILES}}


class Values:
    """A stream of values summarised as mean and percentiles: exact while there are at most `max_exact`
    (None: no limit), then in a LogHistogram (percentiles within 1%, mean exact)."""

    FLUSH = 1 << 16  # values gathered before a histogram takes them in one pass (numpy calls are dear)

    def __init__(self, max_exact: int | None = None) -> None:
        self.max_exact = max_exact
        self._pending: list[np.ndarray] = []  # exact values, or values not yet in the histogram
        self._num_pending = 0
        self.histogram: LogHistogram | None = None

    def add(self, values: np.ndarray) -> None:
        self._pending.append(values)
        self._num_pending += values.size
        limit = self.FLUSH if self.histogram is not None else self.max_exact
        if limit is not None and self._num_pending > limit:
            self._flush()

    def _flush(self) -> None:
        if self.histogram is None:
            self.histogram = LogHistogram()
        self.histogram.add(self._joined())
        self._pending, self._num_pending = [], 0

    def _joined(self) -> np.ndarray:
        return np.concatenate(self._pending) if self._pending else np.empty(0)

    def exact(self) -> np.ndarray:
        assert self.histogram is None, "the values are in a histogram"
        return self._joined()

    @property
    def is_exact(self) -> bool:
        return self.histogram is None

    def merge(self, other: Values) -> None:
        if other.histogram is None:
            self.add(other._joined())
            return
        self._flush()
        assert self.histogram is not None
        self.histogram.merge(other.finished_histogram())

    def finished_histogram(self) -> LogHistogram:
        """The histogram with every value added so far (after the exact phase)."""
        assert self.histogram is not None
        if self._pending:
            self._flush()
        return self.histogram

    def distribution(self) -> dict[str, float]:
        if self.histogram is None:
            return _distribution(self._joined())
        return self.finished_histogram().distribution()


# Per-request scalars kept exactly by MetricsStream (NaN: not reached), in the order requests finish.
_COLUMNS = ("arrival", "e2e", "ttft", "tpot", "scheduling_delay", "prompt", "output", "preemptions", "tenant")


class MetricsStream:
    """Finished requests' metrics, summarised as they come: per-request scalars (TTFT, TPOT, E2E, ...)
    exactly, in 9 floats a request, so any SLO's goodput can be asked afterwards; time between tokens,
    one value a token, exactly up to `max_exact_itl` values (overall, and per tenant), then in
    histograms (see Values). `summarize` is this over a list; a simulation streams into it and so keeps
    no per-token data."""

    def __init__(self, max_exact_itl: int | None = None) -> None:
        self.max_exact_itl = max_exact_itl
        self._cols: dict[str, array] = {c: array("d") for c in _COLUMNS}
        self._tenants: dict[str, int] = {}  # tenant -> its code in the "tenant" column
        self._itl = Values(max_exact_itl)
        self._tenant_itl: dict[str, Values] = {}

    def add_request(self, req: Request) -> None:
        """`add(RequestMetrics.of(req))`, with the times between tokens taken as one array (no list of
        floats per request: the simulator's hot path at scale)."""
        times = np.frombuffer(req.times.tokens, dtype=float)
        self.add(RequestMetrics.of(req, with_itl=False), times[1:] - times[:-1])

    def add(self, m: RequestMetrics, itl: np.ndarray | None = None) -> None:
        """One finished request's metrics; `itl`, when given, instead of `m.itl`."""
        if m.e2e is None:
            return  # unfinished: outside every summary, as in vLLM's benchmarks
        code = self._tenants.get(m.tenant)
        if code is None:
            code = self._tenants[m.tenant] = len(self._tenants)
            self._tenant_itl[m.tenant] = Values(self.max_exact_itl)
        nan = math.nan
        cols = self._cols
        cols["arrival"].append(m.arrival)
        cols["e2e"].append(m.e2e)
        cols["ttft"].append(nan if m.ttft is None else m.ttft)
        cols["tpot"].append(nan if m.tpot is None else m.tpot)
        cols["scheduling_delay"].append(nan if m.scheduling_delay is None else m.scheduling_delay)
        cols["prompt"].append(m.num_prompt_tokens)
        cols["output"].append(m.num_output_tokens)
        cols["preemptions"].append(m.num_preemptions)
        cols["tenant"].append(code)
        if itl is None:
            itl = np.asarray(m.itl, dtype=float)
        if itl.size:
            self._itl.add(itl)
            self._tenant_itl[m.tenant].add(itl)

    def __len__(self) -> int:
        return len(self._cols["e2e"])

    @property
    def tenants(self) -> list[str]:
        return sorted(self._tenants)

    @property
    def itl_exact(self) -> bool:
        """Whether ITL percentiles are exact (else from histograms, within 1%)."""
        return self._itl.is_exact

    def summary(
        self,
        ttft_slo: float | None = None,
        tpot_slo: float | None = None,
        e2e_slo: float | None = None,
        tenant: str | None = None,
    ) -> Summary:
        """Over every tenant, or one."""
        cols = {c: np.frombuffer(self._cols[c], dtype=float) for c in _COLUMNS}
        itl = self._itl
        if tenant is not None:
            mine = cols["tenant"] == self._tenants[tenant]
            cols = {c: v[mine] for c, v in cols.items()}
            itl = self._tenant_itl[tenant]
        n = cols["e2e"].size
        duration = float((cols["arrival"] + cols["e2e"]).max() - cols["arrival"].min()) if n else 0.0
        rate = (lambda x: x / duration) if duration > 0 else (lambda x: float("nan"))
        has_slo = any(s is not None for s in (ttft_slo, tpot_slo, e2e_slo))
        good = np.ones(n, dtype=bool)
        for name, slo in (("ttft", ttft_slo), ("tpot", tpot_slo), ("e2e", e2e_slo)):
            if slo is not None:
                # A one-token answer's TPOT (NaN) meets any target, as in RequestMetrics.meets.
                good &= (cols[name] <= slo) | (np.isnan(cols[name]) if name == "tpot" else False)
        out, prompt = int(cols["output"].sum()), int(cols["prompt"].sum())
        return Summary(
            num_requests=n,
            duration=duration,
            request_throughput=rate(n),
            output_throughput=rate(out),
            total_token_throughput=rate(out + prompt),
            goodput=rate(int(good.sum())) if has_slo else None,
            ttft=_distribution(_present(cols["ttft"])),
            itl=itl.distribution(),
            tpot=_distribution(_present(cols["tpot"])),
            e2e=_distribution(cols["e2e"]),
            scheduling_delay=_distribution(_present(cols["scheduling_delay"])),
            num_preemptions=int(cols["preemptions"].sum()),
        )

    def by_tenant(self, **slos: float | None) -> dict[str, Summary]:
        return {t: self.summary(**slos, tenant=t) for t in self.tenants}

    def column(self, name: str) -> np.ndarray:
        """One per-request value (a name in _COLUMNS) of every finished request, NaN where absent."""
        return np.frombuffer(self._cols[name], dtype=float)

    def itl_cdf(self) -> tuple[np.ndarray, np.ndarray]:
        """Time between tokens as a CDF: (values, fraction of values at or below each); from the
        histogram's bins (upper edges) once the values are no longer exact."""
        if self._itl.is_exact:
            xs = np.sort(self._itl.exact())
            return xs, np.arange(1, xs.size + 1) / max(xs.size, 1)
        hist = self._itl.finished_histogram()
        used = np.nonzero(hist.counts)[0]
        edges = hist.low * hist.ratio ** (used + 1.0)
        return edges, np.cumsum(hist.counts[used]) / hist.count


def _present(values: np.ndarray) -> np.ndarray:
    return values[~np.isnan(values)]


@dataclass(slots=True)
class Summary:
    num_requests: int
    duration: float  # first arrival to last finish
    request_throughput: float  # requests per second
    output_throughput: float  # output tokens per second
    total_token_throughput: float  # prompt + output tokens per second
    goodput: float | None  # requests per second meeting every SLO (None: no SLO given)
    ttft: dict[str, float]
    itl: dict[str, float]
    tpot: dict[str, float]
    e2e: dict[str, float]
    scheduling_delay: dict[str, float]
    num_preemptions: int

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


def summarize(
    metrics: Sequence[RequestMetrics],
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    e2e_slo: float | None = None,
) -> Summary:
    return _stream(metrics).summary(ttft_slo, tpot_slo, e2e_slo)


def summarize_by_tenant(metrics: Sequence[RequestMetrics], **slos: float | None) -> dict[str, Summary]:
    return _stream(metrics).by_tenant(**slos)


def _stream(metrics: Iterable[RequestMetrics]) -> MetricsStream:
    stream = MetricsStream()
    for m in metrics:
        stream.add(m)
    return stream
