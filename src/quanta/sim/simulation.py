"""Discrete-event simulation: N replicas, each quanta's own EngineCore with a SimExecutor and its own
virtual clock, behind a router. Torch-free: it runs the production scheduler on a laptop.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import VirtualClock
from quanta.engine.core import EngineCore, StepOutput
from quanta.executor.sim_executor import SimExecutor
from quanta.metrics import RequestMetrics
from quanta.model.config import ModelConfig
from quanta.request import Request
from quanta.sim.cost_model import CostModel, Efficiency
from quanta.sim.hardware import GPUSpec
from quanta.sim.workload import WorkloadRequest, output_lengths, to_requests

ROUTERS = ("round-robin", "least-load")


@dataclass(slots=True)
class SimConfig:
    model: ModelConfig
    gpu: GPUSpec
    policy: str = "sarathi"
    tp: int = 1
    replicas: int = 1
    router: str = "least-load"
    max_num_batched_tokens: int | None = None  # default: 512 for chunked policies, max_model_len otherwise
    max_num_seqs: int | None = None  # default: 128, or the token budget when that is smaller
    max_model_len: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    efficiency: Efficiency = field(default_factory=Efficiency)
    num_kv_blocks: int | None = None  # default: what the GPU's memory holds after the weights
    preemption_mode: str = "recompute"  # or "swap", into swap_space_gb of host memory per replica
    swap_space_gb: float = 0.0
    block_groups: bool = True
    policy_args: dict = field(default_factory=dict)
    # max_tokens of requests whose trace sets none (None: up to the remaining context, as the server
    # gives a client that sends none). Requests still end at their true length, as at EOS.
    default_max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose from {', '.join(ROUTERS)}")
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")

    @property
    def budget(self) -> int:
        if self.policy == "prefill-first":  # whole prompts: the budget must hold the longest
            return max(self.max_num_batched_tokens or 0, self.max_model_len)
        return self.max_num_batched_tokens or 512


@dataclass(slots=True)
class SimResult:
    config: SimConfig
    requests: list[Request]
    kv_usage: list[list[tuple[float, float]]]  # per replica: (time, fraction of KV blocks in use) per step
    num_steps: int
    wall_seconds: float
    # Over all replicas: swap_outs, swap_ins, swapped_blocks, copy_runs, copy_calls, copy_seconds.
    swap_stats: dict[str, float] = field(default_factory=dict)
    num_computed_tokens: int = 0  # tokens the executors computed, prompt and decode, recomputation included

    @property
    def prefill_tokens_saved(self) -> int:
        """Prompt tokens never computed (served from the prefix cache). A finished request computed its
        uncached prompt and all outputs but the last; whatever else was computed is recomputation, which
        counts against the saving."""
        prompt = sum(r.num_prompt_tokens for r in self.requests)
        decode = sum(max(r.num_output_tokens - 1, 0) for r in self.requests)
        return prompt - (self.num_computed_tokens - decode)

    @property
    def prefill_saved_fraction(self) -> float:
        prompt = sum(r.num_prompt_tokens for r in self.requests)
        return self.prefill_tokens_saved / prompt if prompt else 0.0

    def metrics(self) -> list[RequestMetrics]:
        return [RequestMetrics.of(r) for r in self.requests]

    @property
    def num_preemptions(self) -> int:
        return sum(r.num_preemptions for r in self.requests)


def build_replica(cfg: SimConfig, output_lengths: Mapping[str, int] | None = None) -> EngineCore:
    """One replica; `output_lengths` (request id -> true output length) tells its executor where each
    request emits EOS."""
    cost = CostModel(cfg.model, cfg.gpu, cfg.tp, efficiency=cfg.efficiency)
    num_blocks = cfg.num_kv_blocks or cost.kv_capacity_tokens(cfg.gpu_memory_utilization) // cfg.block_size
    num_host_blocks = int(cfg.swap_space_gb * 2**30 // (cfg.block_size * cost.kv_bytes_per_token()))
    return EngineCore(
        SimExecutor(
            cost,
            num_blocks,
            num_host_blocks=num_host_blocks,
            block_size=cfg.block_size,
            output_lengths=output_lengths,
        ),
        VirtualClock(),
        SchedulerConfig(
            cfg.policy,
            cfg.budget,
            cfg.max_num_seqs or min(128, cfg.budget),
            cfg.max_model_len,
            preemption_mode=cfg.preemption_mode,
            policy_args=cfg.policy_args,
        ),
        CacheConfig(
            block_size=cfg.block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=cfg.enable_prefix_caching,
            block_groups=cfg.block_groups,
        ),
    )


def simulate(workload: Sequence[WorkloadRequest], cfg: SimConfig, progress: bool = False) -> SimResult:
    """Run the workload to completion; `progress` shows a bar over arrived requests."""
    from tqdm.auto import tqdm

    too_long = sum(1 for w in workload if w.prompt_len >= cfg.max_model_len)
    if too_long:
        raise ValueError(
            f"{too_long} requests have prompts of max_model_len ({cfg.max_model_len}) tokens or more"
        )
    started = time.perf_counter()
    bar = tqdm(
        total=len(workload), desc=f"simulating {cfg.policy}", unit="req", disable=not progress, leave=False
    )
    # The true lengths go to the executors only (the "model"); requests carry a client's max_tokens.
    lengths = output_lengths(workload)
    replicas = [build_replica(cfg, lengths) for _ in range(cfg.replicas)]
    usage: list[list[tuple[float, float]]] = [[] for _ in replicas]
    computed = [0] * len(replicas)

    def observe(out: StepOutput, i: int, core: EngineCore) -> None:
        usage[i].append((out.end, core.kv.usage()))
        computed[i] += out.plan.num_batched_tokens

    for i, core in enumerate(replicas):
        core.step_observers.append(lambda out, i=i, core=core: observe(out, i, core))
    requests = to_requests(workload, default_max_tokens=cfg.default_max_tokens)
    pending = sorted(requests, key=lambda r: r.arrival_time)
    rr = itertools.cycle(range(len(replicas)))
    steps = 0
    i = 0
    while True:
        busy = [c for c in replicas if c.has_unfinished()]
        next_step = min((c.clock.now() for c in busy), default=math.inf)
        next_arrival = pending[i].arrival_time if i < len(pending) else math.inf
        if next_arrival == math.inf and next_step == math.inf:
            break
        if next_arrival <= next_step:
            req = pending[i]
            i += 1
            core = replicas[next(rr)] if cfg.router == "round-robin" else min(replicas, key=_load)
            if not core.has_unfinished():
                core.clock.wait_until(req.arrival_time)
            core.add_request(req)
            bar.update(1)
        else:
            min(busy, key=lambda c: c.clock.now()).step()
            steps += 1
    bar.close()
    swap_stats = {
        "swap_outs": sum(c.scheduler.num_swap_outs for c in replicas),
        "swap_ins": sum(c.scheduler.num_swap_ins for c in replicas),
        "swapped_blocks": sum(c.kv.num_swapped_blocks for c in replicas),
        "copy_runs": sum(c.kv.num_swap_runs for c in replicas),
        "copy_calls": sum(c.executor.num_copy_calls for c in replicas),  # type: ignore[attr-defined]
        "copy_seconds": sum(c.executor.swap_seconds for c in replicas),  # type: ignore[attr-defined]
    }
    return SimResult(cfg, requests, usage, steps, time.perf_counter() - started, swap_stats, sum(computed))


def _load(core: EngineCore) -> int:
    """Least-load routing: fewest outstanding requests (running and waiting)."""
    return len(core.scheduler.requests)
