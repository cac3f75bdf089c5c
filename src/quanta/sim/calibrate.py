"""Fit the cost model's efficiency factors to step times measured by the real engine (`quanta profile`).

Profile file format (JSON), written on the machine being modelled and usable anywhere:
  {"format": "quanta-profile/1",
   "device": "cpu" | "cuda:0 (NVIDIA H100 ...)",
   "device_peak_flops": measured matmul FLOP/s in the model dtype,
   "device_mem_bandwidth": measured copy bandwidth, bytes/s,
   "device_mem_bytes": memory size,
   "dtype_bytes": 2,
   "model": {ModelConfig fields},
   "points": [{"batch": [[cached_tokens, new_tokens], ...], "num_sampled": k, "seconds": t}, ...],
   "step_model": "roofline" | "grid",   optional (roofline): which model the simulator prices steps with
   "step_grid": {StepGrid fields}}      optional: measured step times over batch shapes (step_grid.py)

The model time of a point is overhead + sum over parts of max(FLOPs / (peak * e_compute), bytes /
(bandwidth * e_memory)). For a fixed choice of which side binds each part the time is linear in
(1/e_matmul, 1/e_attention, 1/e_memory, overhead), so the fit alternates: pick the binding sides with
the current estimate, solve a least-squares problem on relative errors, repeat until stable.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from quanta.model.config import ModelConfig
from quanta.sim.cost_model import CostModel, Efficiency
from quanta.sim.hardware import GPUSpec
from quanta.sim.step_grid import StepGrid

FORMAT = "quanta-profile/1"
STEP_MODELS = ("roofline", "grid")
# `quanta profile` chooses the grid when the fitted roofline misses the measured steps by more than this
# (mean relative error): the device's step times are not roofline-shaped.
ROOFLINE_TOLERANCE = 0.05


@dataclass(slots=True)
class Profile:
    device: str
    device_peak_flops: float
    device_mem_bandwidth: float
    device_mem_bytes: float
    dtype_bytes: int
    model: ModelConfig
    points: list[dict]
    # "grid" where the profile measured a StepGrid and the roofline does not fit this device well.
    step_model: str = "roofline"
    step_grid: dict | None = None

    def grid(self) -> StepGrid | None:
        """The measured grid, when the profile chose it as the step-time model."""
        if self.step_model != "grid":
            return None
        if self.step_grid is None:
            raise ValueError("the profile chose the grid step model but has no step_grid")
        return StepGrid.from_dict(self.step_grid)

    def check(self) -> None:
        """Every measured figure a finite, positive number and every point a batch of (cached, new) token
        counts: a profile written by hand or cut short is an error on loading, not nonsense (or a
        division by zero) mid-simulation."""
        for name in ("device_peak_flops", "device_mem_bandwidth", "device_mem_bytes", "dtype_bytes"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number")
        if not isinstance(self.points, list):
            raise ValueError("points must be a list")
        for i, p in enumerate(self.points):
            batch = p.get("batch") if isinstance(p, dict) else None
            ok = (
                isinstance(batch, list)
                and batch
                and all(
                    isinstance(b, list)
                    and len(b) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in b)
                    and b[0] >= 0
                    and b[1] >= 1
                    for b in batch
                )
            )
            if not ok:
                raise ValueError(f"point {i}: batch must be a list of [cached tokens, new tokens] pairs")
            if not (isinstance(p.get("num_sampled"), int) and 0 <= p["num_sampled"] <= len(batch)):
                raise ValueError(f"point {i}: num_sampled must be a count of the batch's requests")
            if not _positive(p.get("seconds")):
                raise ValueError(f"point {i}: seconds must be a positive number")

    def spec(self) -> GPUSpec:
        return GPUSpec(
            self.device, self.device_peak_flops, self.device_mem_bandwidth, self.device_mem_bytes, 0.0
        )

    def save(self, path: str | Path) -> None:
        data = {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}
        data["model"] = asdict(self.model)
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            data.pop("format")
            data["model"] = _model_config(data["model"])
            prof = cls(**data)
            if prof.step_model not in STEP_MODELS:
                raise ValueError(f"unknown step_model {prof.step_model!r}")
            prof.check()
            if prof.step_grid is not None:
                StepGrid.from_dict(prof.step_grid)  # a malformed grid is an error here, not mid-simulation
            return prof
        except (OSError, json.JSONDecodeError, TypeError, KeyError, AttributeError, ValueError) as e:
            raise ValueError(f"cannot read profile {str(path)!r}: {e}") from None


def _model_config(block: object) -> ModelConfig:
    """The profile's `model` block, checked as a config.json's shape is: a count of 0 or a string would
    otherwise divide by zero (or fail on a type) mid-simulation."""
    if not isinstance(block, dict):
        raise ValueError("model must be an object of ModelConfig fields")
    try:
        model = ModelConfig(**block)
        model.check()
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {e}") from None
    return model


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(slots=True)
class Fit:
    efficiency: Efficiency
    mean_abs_rel_error: float
    max_abs_rel_error: float


_VARS = ("matmul", "attention", "memory")


def fit(profile: Profile, iterations: int = 30) -> Fit:
    if len(profile.points) < 4:
        raise ValueError("a profile needs at least 4 points to fit 4 parameters")
    spec = profile.spec()
    eff = Efficiency(link=1.0, allreduce_latency=0.0)
    cm = CostModel(profile.model, spec, dtype_bytes=profile.dtype_bytes, efficiency=eff)
    works = [cm.step_work([tuple(b) for b in p["batch"]], p["num_sampled"]) for p in profile.points]
    times = np.array([p["seconds"] for p in profile.points], dtype=float)
    compute_of = {"linear": "matmul", "attention": "attention", "lm_head": "matmul"}
    sides: list[tuple[str, ...]] | None = None
    for _ in range(iterations):
        cur = [
            tuple(
                compute_of[part]
                if flops / (spec.bf16_flops * getattr(eff, compute_of[part]))
                >= nbytes / (spec.mem_bandwidth * eff.memory)
                else "memory"
                for part, (flops, nbytes) in w.items()
            )
            for w in works
        ]
        if cur == sides:
            break
        sides = cur
        rows = np.zeros((len(works), 4))
        for i, (w, side) in enumerate(zip(works, sides)):
            for (flops, nbytes), var in zip(w.values(), side):
                if var == "memory":
                    rows[i, 2] += nbytes / spec.mem_bandwidth
                else:
                    rows[i, _VARS.index(var)] += flops / spec.bf16_flops
            rows[i, 3] = 1.0
        # Relative errors: divide each equation by its measured time.
        x, *_ = np.linalg.lstsq(rows / times[:, None], np.ones(len(times)), rcond=None)
        inv = np.maximum(x[:3], 1e-3)  # an unused or degenerate part keeps a finite efficiency
        eff = Efficiency(
            matmul=float(1 / inv[0]),
            attention=float(1 / inv[1]),
            memory=float(1 / inv[2]),
            step_overhead=float(max(x[3], 0.0)),
            link=1.0,
            allreduce_latency=0.0,
        )
    model = CostModel(profile.model, spec, dtype_bytes=profile.dtype_bytes, efficiency=eff)
    predicted = np.array(
        [model.step_cost([tuple(b) for b in p["batch"]], p["num_sampled"]).total for p in profile.points]
    )
    rel = np.abs(predicted - times) / times
    return Fit(eff, float(rel.mean()), float(rel.max()))
