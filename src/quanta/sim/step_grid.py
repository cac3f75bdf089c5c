"""Profile-driven step times: interpolate measured step times over the batch's shape.

The roofline (cost_model.py) fits GPUs, whose step times are a max of compute and memory time. CPU step
times are not shaped like that (threading, cache effects, per-request work), so a profile may instead
carry a grid of measured steps, and the simulator interpolates it. A step's shape is
  P   prefill tokens: new tokens of requests that are not decoding (chunks, whole prompts)
  D   decodes: requests with one new token after some context
  C   mean context of the decodes (cached tokens each attends to)
  Q   prefill context: the (query, key) pairs the prefill chunks attend to, per prefill token, beyond
      those of one chunk of P tokens from nothing (P^2 / 2): a chunk of n new tokens after c cached ones
      attends to n * c + n^2 / 2 pairs, so one chunk's Q is its c, and several chunks, whose own causal
      triangles are smaller than one chunk of all their tokens, may have a Q below 0
and its time is G(P, D, C) + H(P, Q) + a + b * N: G measured with one prefill chunk that starts from nothing,
H the extra time of a chunk of P tokens after Q cached tokens (measured as a difference, with D = 0;
below Q = 0 along its first segment: a step of two chunks of 256 tokens is one of 512 less its attention
to the other half, about 20% on a CPU), and
a + b * N the engine's host time around the executor for N scheduled requests (scheduling, the update,
the loop; measured by running the real EngineCore, see quanta.profiling.measure_host). G and H are
multilinear between measured points and extend linearly past the last ones (a decode context below the
first measured one counts as that one), so costs linear in the
context (decode attention) or bilinear (a chunk's tokens times its context) are reproduced exactly.
Before interpolating, each table is made non-decreasing along every axis (see _monotone): a step with
more work never takes less time, whatever noise the measurement had, and noise is not biased either way.

Torch-free: the simulator uses it on any machine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from quanta.sched.plan import StepPlan
from quanta.sim.cost_model import CostModel

Batch = list[tuple[int, int]]  # (cached tokens, new tokens) per request


def batch_shape(batch: Batch) -> tuple[int, int, float, float]:
    """(P, D, C, Q) of a batch, as the model executor splits it (a decode: one new token after at least
    one cached token)."""
    prefill = pairs = decodes = context = 0
    for c, n in batch:
        if n == 1 and c > 0:
            decodes += 1
            context += c
        else:
            prefill += n
            pairs += n * (2 * c + n)  # twice the (query, key) pairs: its cached keys and its own triangle
    return _shape_of_sums(prefill, pairs, decodes, context)


def _shape_of_sums(prefill: int, pairs: int, decodes: int, context: int) -> tuple[int, int, float, float]:
    """(P, D, C, Q) from a batch's integer sums: prefill tokens, twice their (query, key) pairs, decodes
    and the decodes' cached tokens."""
    # One chunk of P tokens from nothing (what G measured) attends to P^2 / 2 pairs.
    q = (pairs - prefill * prefill) / (2 * prefill) if prefill else 0.0
    return prefill, decodes, context / decodes if decodes else 0.0, q


def _monotone(table: np.ndarray) -> np.ndarray:
    """A table non-decreasing along every axis, equal to `table` where it already is: the mean of its
    lower envelope (each entry the least of itself and every entry with at least as much work) and its
    upper envelope (the greatest of itself and every entry with at most as much work). Each envelope is
    monotone, so their mean is. Either one alone is biased: the profile's points are medians, which
    noise moves up or down, and the lower envelope alone made every shape near a fast outlier fast (the
    simulator ran systematically short of the real engine)."""
    lower, upper = table, table
    for axis in range(table.ndim):  # running extremes along one axis keep the others monotone
        lower = np.flip(np.minimum.accumulate(np.flip(lower, axis), axis=axis), axis)
        upper = np.maximum.accumulate(upper, axis=axis)
    return (lower + upper) / 2


# Past its last measured value, each axis goes on to this many times that value along its last slope.
_REACH = 64


def _extend(table: np.ndarray, axes: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Add a far point to every axis, on the line through its last two points, so that interpolating
    the extended table extrapolates linearly and stays monotone in every axis (the slopes are made
    non-decreasing along the other axes first; plain extrapolation could dip where noise made a slope
    smaller at a larger context)."""
    out = []
    for k, a in enumerate(axes):
        last = np.take(table, [-1], axis=k)
        slope = (last - np.take(table, [-2], axis=k)) / (a[-1] - a[-2])
        far = max(a[-1] * _REACH, a[-1] + 1.0)
        table = np.concatenate([table, last + (far - a[-1]) * _monotone(slope)], axis=k)
        out.append(np.append(a, far))
    return table, out


def _segment(axis: np.ndarray, x: np.ndarray, below: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Index of the segment of `axis` each x falls in and the position along it: below the first value
    as at it (a decode context under the first measured one: a step of almost nothing more), or with
    `below` along the first segment (a negative position); past the last (far) one along the last."""
    if not below:
        x = np.maximum(x, axis[0])
    i = np.clip(np.searchsorted(axis, x, side="right") - 1, 0, len(axis) - 2)
    lo = axis[i]
    return i, (x - lo) / (axis[i + 1] - lo)


@dataclass(slots=True)
class StepGrid:
    """Measured step times (seconds): seconds[p][d][c] at prefill[p], decodes[d], context[c] (G), and
    extra[p][q] at prefill[p], prefill_context[q] (H; prefill_context[0] is 0 and its column 0)."""

    prefill: list[int]
    decodes: list[int]
    context: list[int]
    seconds: list[list[list[float]]]
    prefill_context: list[int]
    extra: list[list[float]]
    # Host time per step around the executor: host_seconds + host_per_request * scheduled requests.
    host_seconds: float = 0.0
    host_per_request: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prefill", "decodes", "context", "prefill_context"):
            axis = getattr(self, name)
            if len(axis) < 2 or any(b <= a for a, b in itertools.pairwise(axis)):
                raise ValueError(f"step grid axis {name!r} needs at least 2 increasing values")
        if self.prefill[0] != 0 or self.decodes[0] != 0 or self.prefill_context[0] != 0:
            raise ValueError("the prefill, decodes and prefill_context axes start at 0")
        shape = (len(self.prefill), len(self.decodes), len(self.context))
        extra_shape = (len(self.prefill), len(self.prefill_context))
        if np.shape(self.seconds) != shape or np.shape(self.extra) != extra_shape:
            raise ValueError("step grid tables do not match their axes")
        seconds, extra = np.asarray(self.seconds, dtype=float), np.asarray(self.extra, dtype=float)
        host = np.array([self.host_seconds, self.host_per_request], dtype=float)
        if not (np.isfinite(seconds).all() and np.isfinite(extra).all() and np.isfinite(host).all()):
            raise ValueError("step grid times must be finite numbers")
        if (seconds < 0).any() or not (seconds > 0).any():
            raise ValueError("step grid times must be non-negative (and some positive)")

    def to_dict(self) -> dict:
        return {
            "prefill": self.prefill,
            "decodes": self.decodes,
            "context": self.context,
            "seconds": self.seconds,
            "prefill_context": self.prefill_context,
            "extra": self.extra,
            "host_seconds": self.host_seconds,
            "host_per_request": self.host_per_request,
        }

    @classmethod
    def from_dict(cls, data: dict) -> StepGrid:
        return cls(**data)

    @classmethod
    def from_measurements(
        cls,
        prefill: list[int],
        decodes: list[int],
        context: list[int],
        prefill_context: list[int],
        times: dict[tuple[int, int, int, int], float],
        host: tuple[float, float] = (0.0, 0.0),
    ) -> StepGrid:
        """From measured seconds keyed by (P, D, C, Q): every (P, D, C) with Q = 0 (any C when D = 0,
        and (0, 0) excepted: an empty step), and (P, 0, C0, Q) for P > 0. The empty step takes the time
        of the cheapest one measured (what a step of almost nothing costs). `host`: (seconds per step,
        seconds per scheduled request) of host time around the executor."""
        c0 = context[0]
        g = np.zeros((len(prefill), len(decodes), len(context)))
        for i, p in enumerate(prefill):
            for j, d in enumerate(decodes):
                for k, c in enumerate(context):
                    if p == 0 and d == 0:
                        continue
                    g[i, j, k] = times[(p, d, c0 if d == 0 else c, 0)]
        g[0, 0, :] = g[0, 1, 0] if len(prefill) < 2 else min(g[0, 1, 0], g[1, 0, 0])
        h = np.zeros((len(prefill), len(prefill_context)))
        for i, p in enumerate(prefill[1:], 1):
            for q_i, q in enumerate(prefill_context[1:], 1):
                h[i, q_i] = times[(p, 0, c0, q)] - times[(p, 0, c0, 0)]
        return cls(prefill, decodes, context, g.tolist(), prefill_context, h.tolist(), *map(float, host))


class GridStepTime:
    """A StepTimeModel from a StepGrid. Swap copies and KV sizes (migration payloads) stay the roofline
    cost model's: the grid measures compute steps only."""

    def __init__(self, grid: StepGrid, cost: CostModel) -> None:
        self.grid, self.cost, self.model = grid, cost, cost.model
        axes = [np.asarray(a, dtype=float) for a in (grid.prefill, grid.decodes, grid.context)]
        self._g, self._axes = _extend(_monotone(np.asarray(grid.seconds, dtype=float)), axes)
        h = _monotone(np.maximum(np.asarray(grid.extra, dtype=float), 0.0))
        self._h, (self._h_p_axis, self._q_axis) = _extend(
            h, [axes[0], np.asarray(grid.prefill_context, float)]
        )

    def times(self, p: np.ndarray, d: np.ndarray, c: np.ndarray, q: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Step times of shapes given elementwise, `n` the scheduled requests (the same operations for
        one step or many, so that plan_time and decode_times agree to the last bit)."""
        (ip, tp), (id_, td), (ic, tc) = (_segment(a, x) for a, x in zip(self._axes, (p, d, c)))
        g = self._g
        total = np.zeros(np.shape(p))
        for dp, wp in ((0, 1 - tp), (1, tp)):
            for dd, wd in ((0, 1 - td), (1, td)):
                for dc, wc in ((0, 1 - tc), (1, tc)):
                    total = total + wp * wd * wc * g[ip + dp, id_ + dd, ic + dc]
        (jp, sp), (iq, tq) = _segment(self._h_p_axis, p), _segment(self._q_axis, q, below=True)
        h = self._h
        extra = (1 - sp) * ((1 - tq) * h[jp, iq] + tq * h[jp, iq + 1]) + sp * (
            (1 - tq) * h[jp + 1, iq] + tq * h[jp + 1, iq + 1]
        )
        host = self.grid.host_seconds + self.grid.host_per_request * n
        return total + extra + host

    def batch_time(self, batch: Batch) -> float:
        p, d, c, q = batch_shape(batch)
        return float(self.times(*(np.array([x], dtype=float) for x in (p, d, c, q, len(batch))))[0])

    def plan_time(self, plan: StepPlan) -> float:
        return self.batch_time([(s.num_computed_tokens, s.num_new_tokens) for s in plan.scheduled])

    def chunk_time(self, num_decodes: int, decode_context: int, cached: int, new: int, sample: bool) -> float:
        """plan_time of a step of `num_decodes` decodes after `decode_context` cached tokens in all and one
        chunk of `new` tokens after `cached`, to the last bit: batch_shape's sums, from the totals."""
        p, pairs, d, context = 0, 0, num_decodes, decode_context
        if new == 1 and cached > 0:  # a one-token chunk reads as a decode (batch_shape)
            d, context = d + 1, context + cached
        else:
            p, pairs = new, new * (2 * cached + new)
        shape = (*_shape_of_sums(p, pairs, d, context), num_decodes + 1)
        return float(self.times(*(np.array([x], dtype=float) for x in shape))[0])

    def decode_times(self, num_seqs: int, context_tokens: np.ndarray) -> np.ndarray:
        n = len(context_tokens)
        # Mean context as batch_shape computes it: the int total divided by the count, in float64.
        mean = np.asarray(context_tokens, dtype=np.int64) / num_seqs
        zeros, seqs = np.zeros(n), np.full(n, float(num_seqs))
        return self.times(zeros, seqs, mean, zeros, seqs)

    # ---- what the roofline model still prices ------------------------------------------------------
    def kv_bytes_per_token(self) -> float:
        return self.cost.kv_bytes_per_token()

    def copy_time(self, num_runs: int, num_tokens: int) -> float:
        return self.cost.copy_time(num_runs, num_tokens)
