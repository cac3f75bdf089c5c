"""Discrete-event simulation: N replicas, each quanta's own EngineCore with a SimExecutor and its own
virtual clock, behind a router. Torch-free: it runs the production scheduler on a laptop.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import VirtualClock
from quanta.engine.core import DecodeRun, EngineCore
from quanta.executor.sim_executor import SimExecutor
from quanta.metrics import MetricsStream, RequestMetrics, Summary
from quanta.model.config import ModelConfig
from quanta.request import Request
from quanta.sim.cost_model import CostModel, Efficiency
from quanta.sim.hardware import GPUSpec
from quanta.sim.programs import ProgramSource
from quanta.sim.sources import ArrivalSource, TraceSource
from quanta.sim.workload import WorkloadRequest, iter_requests, output_lengths, to_requests

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
    # Plan provably repeating pure-decode steps at once (exact; off: one schedule() call per step).
    decode_runs: bool = True
    # Keep every Request and its per-token timestamps (None: when the workload has at most
    # KEEP_REQUESTS_UP_TO requests). Summaries stream either way.
    keep_requests: bool | None = None
    check_integrity: bool = False  # KV and scheduler invariants after every step (and run): for tests

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


# Runs of decode steps are planned this many steps at a time at most: an arrival routed to the replica
# cuts a run short, and the steps priced past the cut are wasted work.
RUN_STEPS = 256
# Up to this many requests a simulation keeps every Request (per-token timestamps, for plots and
# per-request analysis); beyond, finished requests only stream into fixed-size summaries.
KEEP_REQUESTS_UP_TO = 20_000
# Time-between-tokens values kept exactly (then histograms, percentiles within 1%) when not keeping requests.
MAX_EXACT_ITL = 4_000_000


class UsageTrace:
    """(time, fraction of KV blocks in use) after each step of one replica, in at most `cap` points:
    when full, every other point goes and only every other step is recorded from then on, so a long run
    keeps an evenly spaced outline. The peak is exact (a run of decode steps, which only takes blocks,
    records its end)."""

    __slots__ = ("_count", "cap", "peak", "points", "stride")

    def __init__(self, cap: int = 4096) -> None:
        self.cap = cap
        self.points: list[tuple[float, float]] = []
        self.stride = 1
        self._count = 0
        self.peak = 0.0

    def record(self, t: float, usage: float) -> None:
        if usage > self.peak:
            self.peak = usage
        if self._count % self.stride == 0:
            self.points.append((t, usage))
            if len(self.points) > self.cap:
                self.points = self.points[::2]
                self.stride *= 2
        self._count += 1


@dataclass(slots=True)
class SimResult:
    config: SimConfig
    # Every request with its timestamps, when kept (small runs: see SimConfig.keep_requests); else empty.
    requests: list[Request]
    kv_usage: list[list[tuple[float, float]]]  # per replica: (time, fraction of KV blocks in use), thinned
    num_steps: int
    wall_seconds: float
    # Over all replicas: swap_outs, swap_ins, swapped_blocks, copy_runs, copy_calls, copy_seconds.
    swap_stats: dict[str, float] = field(default_factory=dict)
    stream: MetricsStream = field(default_factory=MetricsStream)  # every finished request's metrics
    peak_kv_usage: float = 0.0
    simulated_seconds: float = 0.0  # virtual time from the first arrival to the last step's end
    num_requests: int = 0
    num_decode_runs: int = 0  # runs of steps advanced at once (SimConfig.decode_runs)
    num_computed_tokens: int = 0  # tokens the executors computed, prompt and decode, recomputation included
    pinned_kv: list[list[tuple[float, float]]] = field(default_factory=list)  # per replica (programs only)
    cores: list[EngineCore] = field(default_factory=list)  # the replicas, as the run left them

    @property
    def prefill_tokens_saved(self) -> int:
        """Prompt tokens never computed (served from the prefix cache). A finished request computed its
        uncached prompt and all outputs but the last; whatever else was computed is recomputation, which
        counts against the saving."""
        if not self.requests and self.num_requests:
            raise ValueError("this simulation kept no per-request data (keep_requests)")
        prompt = sum(r.num_prompt_tokens for r in self.requests)
        decode = sum(max(r.num_output_tokens - 1, 0) for r in self.requests)
        return prompt - (self.num_computed_tokens - decode)

    @property
    def prefill_saved_fraction(self) -> float:
        prompt = sum(r.num_prompt_tokens for r in self.requests)
        return self.prefill_tokens_saved / prompt if prompt else 0.0

    def metrics(self) -> list[RequestMetrics]:
        if not self.requests and self.num_requests:
            raise ValueError("this simulation kept no per-request data (keep_requests): use .summary()")
        return [RequestMetrics.of(r) for r in self.requests]

    def summary(self, **slos: float | None) -> Summary:
        return self.stream.summary(**slos)

    def summary_by_tenant(self, **slos: float | None) -> dict[str, Summary]:
        return self.stream.by_tenant(**slos)

    @property
    def num_preemptions(self) -> int:
        return self.summary().num_preemptions


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
        check_integrity=cfg.check_integrity,
    )


@dataclass(slots=True)
class _Replica:
    core: EngineCore
    usage: UsageTrace
    run: DecodeRun | None = None  # planned steps not yet applied (the heap wakes the replica at its end)
    version: int = 0  # bumped whenever the replica is rescheduled: older heap entries are stale


def simulate(
    workload: Sequence[WorkloadRequest] | ProgramSource, cfg: SimConfig, progress: bool = False
) -> SimResult:
    """Run the workload to completion; `progress` shows a bar over arrived requests.

    A discrete-event loop over a heap of replica clocks: the replica that is furthest behind steps next,
    and an arrival is routed once every replica has run all steps that begin before it (ties: the
    arrival first). With `cfg.decode_runs`, a replica whose next steps provably repeat one pure-decode
    plan (Scheduler.decode_run) plans them at once; a router only reads a replica's load, which such a
    run leaves unchanged, so the run waits in the heap until its end, and an arrival routed to the
    replica first applies only the run's steps that begin before it. The schedule is exactly the
    step-by-step one (tests/test_sim_fast_forward.py checks it).

    `workload` may be a closed-loop source of agent programs' calls (ProgramSource): a call that
    finishes tells the source, which schedules the program's next call."""
    from tqdm.auto import tqdm

    closed = isinstance(workload, ProgramSource)
    if closed:
        num_requests, first = workload.num_calls, workload.first_arrival
        if workload.max_context >= cfg.max_model_len:
            raise ValueError(
                f"a program's context reaches max_model_len ({cfg.max_model_len}) tokens or more"
            )
    else:
        num_requests, first = len(workload), min((w.arrival for w in workload), default=0.0)
        too_long = sum(1 for w in workload if w.prompt_len >= cfg.max_model_len)
        if too_long:
            raise ValueError(
                f"{too_long} requests have prompts of max_model_len ({cfg.max_model_len}) tokens or more"
            )
    started = time.perf_counter()
    bar = tqdm(
        total=num_requests, desc=f"simulating {cfg.policy}", unit="req", disable=not progress, leave=False
    )
    keep = cfg.keep_requests if cfg.keep_requests is not None else num_requests <= KEEP_REQUESTS_UP_TO
    stream = MetricsStream(None if keep else MAX_EXACT_ITL)
    kept: list[Request] = []
    in_order = True
    source: ArrivalSource
    if closed:
        source = workload
    else:
        arrivals = [w.arrival for w in workload]
        in_order = all(a <= b for a, b in itertools.pairwise(arrivals))
        # The true lengths go to the executors only (the "model"); requests carry a client's max_tokens.
        lengths = output_lengths(workload)
        if in_order:  # requests made as they arrive: a long trace's prompts are never all in memory
            pending: Iterator[Request] = iter_requests(workload, default_max_tokens=cfg.default_max_tokens)
        else:
            kept = to_requests(workload, default_max_tokens=cfg.default_max_tokens)
            pending = iter(sorted(kept, key=lambda r: r.arrival_time))
            if not keep:
                kept = []
        source = TraceSource(pending, lengths)
    reps = [_Replica(build_replica(cfg, source.output_lengths), UsageTrace()) for _ in range(cfg.replicas)]
    pins = [[] for _ in reps] if closed else None  # per replica: (time, pinned fraction of the KV pool)

    def finished(r: Request, t: float) -> None:
        stream.add(RequestMetrics.of(r))
        source.on_finished(r, t)

    rr = itertools.cycle(range(len(reps)))
    heap: list[tuple[float, int, int]] = []  # (clock time the replica next acts, replica index, version)
    steps = runs = computed = 0

    def wake(i: int) -> None:
        rep = reps[i]
        rep.version += 1
        # A run is applied when its last step begins: that step may finish requests, and an arrival
        # after its start must see the replica's load without them, as step by step.
        t = rep.run.starts[-1] if rep.run is not None else rep.core.clock.now()
        heapq.heappush(heap, (t, i, rep.version))

    def finish_run(rep: _Replica, num_steps: int | None = None) -> None:
        nonlocal steps, computed
        run = rep.run
        assert run is not None
        rep.run = None
        m = len(run) if num_steps is None else num_steps
        steps += m
        computed += m * len(rep.core.scheduler.running)  # every running request decodes in each step
        if m == len(run) and m > 1:
            # The last step may free blocks: record the usage before it too (the run's peak).
            rep.core.apply_decode_run(run, m - 1)
            rep.usage.record(run.ends[m - 2], rep.core.kv.usage())
            run, m = run.tail(m - 1), 1
        if m:
            for r in rep.core.apply_decode_run(run, m):
                finished(r, run.ends[m - 1])
            rep.usage.record(run.ends[m - 1], rep.core.kv.usage())

    while True:
        while heap and heap[0][2] != reps[heap[0][1]].version:
            heapq.heappop(heap)  # stale
        next_step = heap[0][0] if heap else math.inf
        next_arrival = source.next_arrival_time()
        if next_arrival == math.inf and not heap:
            break
        if next_arrival <= next_step:
            req = source.pop()
            # Routers read at most a replica's load, which a pending run leaves as it is; one that reads
            # more (KV usage, the prefix cache) would first have to apply runs up to the arrival.
            if cfg.router == "round-robin":
                i = next(rr)
            else:  # least load, the first of equals
                loads = [_load(rep.core) for rep in reps]
                i = loads.index(min(loads))
            rep = reps[i]
            core = rep.core
            if rep.run is not None:
                finish_run(rep, rep.run.steps_before(req.arrival_time))
            elif not core.has_unfinished():
                core.clock.wait_until(req.arrival_time)
            core.add_request(req)
            if keep and in_order:
                kept.append(req)
            if pins is not None:
                pins[i].append((req.arrival_time, core.kv.num_pinned_blocks / core.kv.num_blocks))
            wake(i)
            bar.update(1)
            continue
        heap_time, i, _ = heapq.heappop(heap)
        rep = reps[i]
        core = rep.core
        if rep.run is not None:
            finish_run(rep)
            if not core.has_unfinished():
                continue
            if core.clock.now() > heap_time:  # the run ended later than its last step began
                wake(i)
                continue
        if cfg.decode_runs:
            run = core.decode_run(RUN_STEPS)
            if run is not None:
                rep.run = run
                runs += 1
                wake(i)
                continue
        out = core.step()
        steps += 1
        computed += out.plan.num_batched_tokens
        rep.usage.record(out.end, core.kv.usage())
        for r in out.updated:
            if r.finished:
                finished(r, out.end)
        if pins is not None and (
            not pins[i] or pins[i][-1][1] != core.kv.num_pinned_blocks / core.kv.num_blocks
        ):
            pins[i].append((out.end, core.kv.num_pinned_blocks / core.kv.num_blocks))
        if core.has_unfinished():
            wake(i)
    bar.close()
    cores = [rep.core for rep in reps]
    swap_stats = {
        "swap_outs": sum(c.scheduler.num_swap_outs for c in cores),
        "swap_ins": sum(c.scheduler.num_swap_ins for c in cores),
        "swapped_blocks": sum(c.kv.num_swapped_blocks for c in cores),
        "copy_runs": sum(c.kv.num_swap_runs for c in cores),
        "copy_calls": sum(c.executor.num_copy_calls for c in cores),  # type: ignore[attr-defined]
        "copy_seconds": sum(c.executor.swap_seconds for c in cores),  # type: ignore[attr-defined]
    }
    return SimResult(
        cfg,
        kept,
        [rep.usage.points for rep in reps],
        steps,
        time.perf_counter() - started,
        swap_stats,
        stream,
        peak_kv_usage=max(rep.usage.peak for rep in reps),
        simulated_seconds=max((c.clock.now() for c in cores), default=first) - first,
        num_requests=num_requests,
        num_decode_runs=runs,
        num_computed_tokens=computed,
        pinned_kv=pins or [],
        cores=cores,
    )


def _load(core: EngineCore) -> int:
    """Least-load routing: fewest outstanding requests (running and waiting)."""
    return len(core.scheduler.requests)
