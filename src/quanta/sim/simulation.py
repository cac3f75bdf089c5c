"""Discrete-event simulation: N replicas, each quanta's own EngineCore with a SimExecutor and its own
virtual clock, behind the cluster's global scheduler (quanta.cluster: the same routers, rescheduler and
migration state machine as a real cluster). Torch-free: it runs the production scheduler on a laptop.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from quanta.cluster.endpoint import MigrationEndpoint
from quanta.cluster.migration import Migration, Phase
from quanta.cluster.rescheduler import Rescheduler
from quanta.cluster.router import dispatch, make_router, router_names
from quanta.cluster.transport import SimulatedTransport
from quanta.cluster.view import ClusterView
from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import VirtualClock
from quanta.engine.core import DecodeRun, EngineCore
from quanta.executor.sim_executor import SimExecutor, StepTimeModel
from quanta.metrics import MetricsStream, RequestMetrics, Summary
from quanta.model.config import ModelConfig
from quanta.request import Request
from quanta.sim.cost_model import CostModel, Efficiency
from quanta.sim.hardware import GPUSpec
from quanta.sim.programs import ProgramSource
from quanta.sim.sources import ArrivalSource, TraceSource
from quanta.sim.step_grid import GridStepTime, StepGrid
from quanta.sim.workload import (
    WorkloadRequest,
    iter_requests,
    output_lengths,
    prompts_share_nothing,
    to_requests,
)

ROUTERS = tuple(router_names())


@dataclass(slots=True)
class SimConfig:
    model: ModelConfig
    gpu: GPUSpec
    policy: str = "sarathi"
    tp: int = 1
    replicas: int = 1
    router: str = "least-load"
    router_args: dict = field(default_factory=dict)
    # Seconds between the controller's polls of every replica's snapshot (None: a fresh snapshot at each
    # arrival, no staleness). Routers read the last poll plus the dispatches counted since.
    poll_interval: float | None = None
    # Live migration (Llumnix): at each poll the rescheduler pairs replicas by freeness and migrates.
    migration: bool = False
    migration_pairing: str = "defrag"  # Llumnix's default pairing
    migration_threshold: float = 3.0  # freeness below: a source; above: a destination
    migration_choice: str = "shortest"
    migration_max_stages: int = 3
    migration_last_stage_blocks: int = 4
    link_bandwidth: float = 25e9  # bytes/s between replicas (KV copies of a migration)
    link_latency: float = 1e-3  # seconds per controller call / transfer
    max_num_batched_tokens: int | None = None  # default: 512 for chunked policies, max_model_len otherwise
    max_num_seqs: int | None = None  # default: 128, or the token budget when that is smaller
    max_model_len: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # The prefix cache's block hash (quanta.kv.block_pool.HASH_ALGOS). Simulated prompts are no attack
    # surface, so the cheap one: it keys the same blocks as SHA-256 barring a 64-bit collision.
    prefix_cache_hash: str = "tuple"
    efficiency: Efficiency = field(default_factory=Efficiency)
    # Measured step times to interpolate instead of the roofline (a profile's, for its model, tp 1).
    step_grid: StepGrid | None = None
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
    # When no two requests of a trace share a prompt block (no prefix groups, no sessions), hash only
    # the blocks a request may look up again itself, after a preemption (CacheConfig.private_prompts;
    # exact: the same hits and block ids; off: every full block hashed and indexed, as a server does).
    private_prompts: bool = True
    # Keep every Request and its per-token timestamps (None: when the workload has at most
    # KEEP_REQUESTS_UP_TO requests). Summaries stream either way.
    keep_requests: bool | None = None
    check_integrity: bool = False  # KV and scheduler invariants after every step (and run): for tests

    def __post_init__(self) -> None:
        make_router(self.router, **self.router_args)  # a clear error for an unknown router or argument
        if self.migration:
            Rescheduler(self.migration_pairing, self.migration_threshold, self.migration_choice)
            if self.poll_interval is None:
                self.poll_interval = 0.05  # Llumnix's instances report every 50 ms
        if self.poll_interval is not None and not 0 < self.poll_interval < math.inf:
            raise ValueError("poll_interval must be a positive, finite number of seconds")
        if not 0 <= self.swap_space_gb < math.inf:
            raise ValueError("swap_space_gb must be a non-negative, finite number")
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        for name in ("max_num_batched_tokens", "max_num_seqs", "num_kv_blocks"):  # None: the default
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (or left unset for the default)")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        if self.step_grid is not None and self.tp != 1:
            raise ValueError("a measured step grid prices one device: it cannot model tensor parallelism")

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
    # Tokens finished requests had to compute (uncached prompt, outputs but the last): what the executors
    # computed beyond this, for finished requests, was recomputation after preemption.
    num_needed_tokens: int = 0
    # Of finished requests: their prompt tokens, and their outputs but the last (computed once each).
    num_prompt_tokens: int = 0
    num_decode_tokens: int = 0
    migrations: list[Migration] = field(default_factory=list)  # every migration started, as it ended
    prefix_cache_queries: int = 0  # prompt blocks looked up in the replicas' prefix caches
    prefix_cache_hits: int = 0
    num_polls: int = 0
    pinned_kv: list[list[tuple[float, float]]] = field(default_factory=list)  # per replica (programs only)
    cores: list[EngineCore] = field(default_factory=list)  # the replicas, as the run left them

    @property
    def recomputed_tokens(self) -> int:
        """Preemption loss: tokens computed again because a preempted request lost its KV."""
        return self.num_computed_tokens - self.num_needed_tokens

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def num_migrations(self) -> int:
        return sum(m.committed for m in self.migrations)

    @property
    def downtimes(self) -> list[float]:
        return [m.downtime for m in self.migrations if m.committed and m.downtime is not None]

    @property
    def prefill_tokens_saved(self) -> int:
        """Prompt tokens never computed (served from the prefix cache). A finished request computed its
        uncached prompt and all outputs but the last; whatever else was computed is recomputation, which
        counts against the saving."""
        return self.num_prompt_tokens - (self.num_computed_tokens - self.num_decode_tokens)

    @property
    def prefill_saved_fraction(self) -> float:
        return self.prefill_tokens_saved / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

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


def build_replica(
    cfg: SimConfig,
    output_lengths: Mapping[str, int] | None = None,
    start: float = 0.0,
    private_prompts: bool = False,
) -> EngineCore:
    """One replica, its clock at `start`; `output_lengths` (request id -> true output length) tells its
    executor where each request emits EOS; `private_prompts`: the workload's requests share no prompt
    block (CacheConfig.private_prompts)."""
    cost = CostModel(cfg.model, cfg.gpu, cfg.tp, efficiency=cfg.efficiency)
    num_blocks = cfg.num_kv_blocks or cost.kv_capacity_tokens(cfg.gpu_memory_utilization) // cfg.block_size
    num_host_blocks = int(cfg.swap_space_gb * 2**30 // (cfg.block_size * cost.kv_bytes_per_token()))
    step_time: StepTimeModel = cost if cfg.step_grid is None else GridStepTime(cfg.step_grid, cost)
    return EngineCore(
        SimExecutor(
            step_time,
            num_blocks,
            num_host_blocks=num_host_blocks,
            block_size=cfg.block_size,
            output_lengths=output_lengths,
        ),
        VirtualClock(start),
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
            prefix_cache_hash=cfg.prefix_cache_hash,
            private_prompts=private_prompts,
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
    arrival first). Controller events (polls, migration phases) are ordered the same way, after
    arrivals. With `cfg.decode_runs`, a replica whose next steps provably repeat one pure-decode plan
    (Scheduler.decode_run) plans them at once; the run waits in the heap until its end, and anything
    that reads or changes the replica earlier (an arrival routed there, a router reading KV state, a
    poll, a migration phase) first applies only the run's steps that begin before it. The schedule is
    exactly the step-by-step one (tests/test_sim_fast_forward.py checks it).

    Dispatch goes through the cluster's router over a ClusterView: with `cfg.poll_interval` None the view
    is refreshed at each arrival, otherwise at each poll (the dispatches counted in between). With
    `cfg.migration`, each poll asks the rescheduler for migrations; their phases are timed events (the
    copies priced by a SimulatedTransport) while the source keeps stepping, and the last stage's
    downtime shows in the request's time between tokens.

    `workload` may be a closed-loop source of agent programs' calls (ProgramSource): a call that
    finishes tells the source, which schedules the program's next call."""
    with _fewer_collections():
        return _simulate(workload, cfg, progress)


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """No cyclic GC during a run: the loop allocates millions of short-lived containers (token lists,
    snapshots) that reference counting frees, and collections would scan the run's live objects over
    and over (about 10% of a large run's time at the default thresholds, on the Azure trace). The loop
    makes next to no cycles (a few hundred objects a run). The GC's state is put back afterwards, with
    the run's survivors moved to the oldest generation first (freeze, then unfreeze): left in the
    youngest, the first collection after the run would scan them all (about 0.8 s after the Azure
    trace), only to find them alive."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if enabled:
            gc.enable()


def _simulate(
    workload: Sequence[WorkloadRequest] | ProgramSource, cfg: SimConfig, progress: bool
) -> SimResult:
    from tqdm.auto import tqdm

    closed = isinstance(workload, ProgramSource)
    if closed:
        num_requests, first = workload.num_calls, workload.first_arrival
        if workload.max_context >= cfg.max_model_len:
            raise ValueError(
                f"a program's context reaches max_model_len ({cfg.max_model_len}) tokens or more"
            )
    else:
        if not all(math.isfinite(w.arrival) for w in workload):
            raise ValueError("every request needs a finite arrival time (the workload holds nan or inf)")
        num_requests, first = len(workload), min((w.arrival for w in workload), default=0.0)
        if any(w.prompt_len < 1 or w.output_len < 1 for w in workload):
            # (read_trace serves a trace's 0-token outputs as 1; a request built in code gets no such help)
            raise ValueError("every request needs prompt_len and output_len of at least 1")
        too_long = [w.prompt_len for w in workload if w.prompt_len >= cfg.max_model_len]
        if too_long:
            raise ValueError(
                f"{len(too_long)} requests have prompts of max_model_len ({cfg.max_model_len}) tokens or more"
                f" (the longest: {max(too_long)}); a larger max_model_len (--max-model-len) replays them"
            )
    started = time.perf_counter()
    bar = tqdm(
        total=num_requests, desc=f"simulating {cfg.policy}", unit="req", disable=not progress, leave=False
    )
    keep = cfg.keep_requests if cfg.keep_requests is not None else num_requests <= KEEP_REQUESTS_UP_TO
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
    # Clocks start at 0, or at the first arrival where a trace starts before 0 (else those requests would
    # wait from their arrival until 0).
    start = min(first, 0.0)
    private = cfg.private_prompts and not closed and prompts_share_nothing(workload)  # type: ignore[arg-type]
    reps = [
        _Replica(build_replica(cfg, source.output_lengths, start, private), UsageTrace()) for _ in range(cfg.replicas)
    ]
    pins: list[list[tuple[float, float]]] | None = [[] for _ in reps] if closed else None
    transport = SimulatedTransport(cfg.link_bandwidth, cfg.link_latency)
    endpoints = [MigrationEndpoint(rep.core, transport, i) for i, rep in enumerate(reps)]
    router = make_router(cfg.router, **cfg.router_args)
    rescheduler = (
        Rescheduler(cfg.migration_pairing, cfg.migration_threshold, cfg.migration_choice)
        if cfg.migration
        else None
    )
    view = ClusterView(cfg.block_size, hash_algo=cfg.prefix_cache_hash)
    for ep in endpoints:
        view.update(ep.state())
    stream = MetricsStream(None if keep else MAX_EXACT_ITL)
    kept_at: dict[str, int] = {}  # request id -> index in kept (a migrated request's copy replaces it)
    if keep:
        kept_at = {r.request_id: k for k, r in enumerate(kept)}
    heap: list[tuple[float, int, int]] = []  # (clock time the replica next acts, replica index, version)
    # Controller events: (time, sequence, migration or None for a poll).
    ctl: list[tuple[float, int, Migration | None]] = []
    ctl_seq = itertools.count()
    if cfg.poll_interval is not None and source.next_arrival_time() < math.inf:
        heapq.heappush(ctl, (source.next_arrival_time(), next(ctl_seq), None))
    migrations: list[Migration] = []
    active: dict[str, Migration] = {}
    steps = runs = computed = needed = polls = prompt_tokens = decode_tokens = 0
    # Whether the view holds replica i's light snapshot (instance_state without detail) as it reads now:
    # refreshing an unchanged replica would hand the view an equal snapshot, so it is skipped. Cleared
    # wherever the loop changes a replica (a step, a run applied, an arrival, a migration phase).
    fresh = [False] * len(reps)

    def wake(i: int) -> None:
        rep = reps[i]
        rep.version += 1
        fresh[i] = False
        # A run is applied when its last step begins: that step may finish requests, and an arrival
        # after its start must see the replica's load without them, as step by step.
        t = rep.run.start(-1) if rep.run is not None else rep.core.clock.now()
        heapq.heappush(heap, (t, i, rep.version))

    def done(r: Request, t: float) -> None:
        nonlocal needed, prompt_tokens, decode_tokens
        stream.add_request(r)
        decode = max(r.num_output_tokens - 1, 0)
        needed += r.num_prompt_tokens - r.num_cached_tokens + decode
        prompt_tokens += r.num_prompt_tokens
        decode_tokens += decode
        source.on_finished(r, t)  # a closed-loop source schedules the program's next call

    def finish_run(i: int, num_steps: int | None = None) -> None:
        nonlocal steps, computed
        rep = reps[i]
        run = rep.run
        assert run is not None
        rep.run = None
        fresh[i] = False
        m = len(run) if num_steps is None else num_steps
        steps += m
        computed += run.num_tokens(m, len(rep.core.scheduler.running))
        if m:
            # The last step may free blocks: record the usage before it too (the run's peak).
            peak = (lambda: rep.usage.record(run.end(m - 2), rep.core.kv.usage())) if m == len(run) > 1 else None
            for r in rep.core.apply_decode_run(run, m, peak):
                done(r, run.end(m - 1))
            rep.usage.record(run.end(m - 1), rep.core.kv.usage())

    def catch_up(i: int, t: float) -> None:
        """Apply the replica's planned steps that begin before t: it reads as step by step would at t."""
        rep = reps[i]
        if rep.run is not None:
            finish_run(i, rep.run.steps_before(t))
            wake(i)

    def refresh(t: float, full: bool) -> None:
        """Fresh snapshots of every replica at t (`full`: KV and prefix state too, so runs are cut)."""
        for i, ep in enumerate(endpoints):
            if full:
                catch_up(i, t)
            elif fresh[i]:
                continue
            view.update(ep.core.instance_state(i, detail=full))
            fresh[i] = not full

    def controller(t: float, m: Migration | None) -> None:
        nonlocal polls
        if m is None:  # a poll
            polls += 1
            refresh(t, full=True)
            if rescheduler is not None:
                for order in rescheduler.plan(view):
                    mig = Migration(
                        order.request_id,
                        order.src,
                        order.dst,
                        order.num_blocks,
                        cfg.migration_max_stages,
                        cfg.migration_last_stage_blocks,
                        seconds=transport.seconds,
                    )
                    active[mig.request_id] = mig
                    view.migrations[mig.request_id] = (mig.src, mig.dst)
                    heapq.heappush(ctl, (t, next(ctl_seq), mig))
            if source.next_arrival_time() < math.inf or heap or active:
                heapq.heappush(ctl, (t + cfg.poll_interval, next(ctl_seq), None))  # type: ignore[operator]
            return
        src, dst = reps[m.src].core, reps[m.dst].core
        catch_up(m.src, t)
        catch_up(m.dst, t)
        if m.phase in (Phase.STAGE_OUT, Phase.LAST_OUT):
            t = max(t, src.clock.now())  # the source acts between its steps
        # Both are woken at t below: one idle, or asleep with requests it could not run, waited until t
        # (its clock lags: left there, it would step, and run what migrated in, before t).
        src.clock.wait_until(t)
        dst.clock.wait_until(t)
        delay = m.advance(endpoints[m.src], endpoints[m.dst], t)
        fresh[m.src] = fresh[m.dst] = False
        for i in (m.src, m.dst):
            if reps[i].core.has_unfinished():
                wake(i)
        if not m.finished:
            heapq.heappush(ctl, (t + max(delay, cfg.link_latency), next(ctl_seq), m))
            return
        del active[m.request_id]
        del view.migrations[m.request_id]
        migrations.append(m)
        if m.committed and keep and m.request_id in kept_at:
            kept[kept_at[m.request_id]] = dst.scheduler.requests[m.request_id]

    while True:
        while heap and heap[0][2] != reps[heap[0][1]].version:
            heapq.heappop(heap)  # stale
        next_step = heap[0][0] if heap else math.inf
        next_ctl = ctl[0][0] if ctl else math.inf
        next_arrival = source.next_arrival_time()
        if next_arrival == math.inf and not heap and not ctl:
            break
        if next_arrival <= min(next_step, next_ctl):
            req = source.pop()
            t = req.arrival_time
            if cfg.poll_interval is None and router.reads_state:
                # A fresh view at each arrival. Load counts are exact while a run is pending (a run
                # only finishes requests in its last step, which is applied when it begins); a router
                # that reads KV state makes every replica apply its runs up to the arrival first.
                refresh(t, full=router.reads_kv)
            i = dispatch(router, view, req)
            rep = reps[i]
            core = rep.core
            if rep.run is not None:
                finish_run(i, rep.run.steps_before(t))
            else:  # idle, or asleep with requests it could not run (a busy replica's clock is past t)
                core.clock.wait_until(t)
            core.add_request(req)
            if keep and in_order:
                kept_at[req.request_id] = len(kept)
                kept.append(req)
            if pins is not None:
                pins[i].append((t, core.kv.num_pinned_blocks / core.kv.num_blocks))
            wake(i)
            bar.update(1)
            continue
        if next_ctl <= next_step:
            t, _, m = heapq.heappop(ctl)
            controller(t, m)
            continue
        heap_time, i, _ = heapq.heappop(heap)
        rep = reps[i]
        core = rep.core
        if rep.run is not None:
            finish_run(i)
            if not core.has_unfinished():
                continue
            if core.clock.now() > heap_time:  # the run ended later than its last step began
                wake(i)
                continue
        if not core.has_unfinished():
            continue  # woken by a migration that left it nothing to do
        if cfg.decode_runs:
            run = core.decode_run(RUN_STEPS)
            if run is not None:
                rep.run = run
                runs += 1
                wake(i)
                continue
        out = core.step()
        fresh[i] = False
        steps += 1
        computed += out.plan.num_batched_tokens
        rep.usage.record(out.end, core.kv.usage())
        for r in out.updated:
            if r.finished:
                done(r, out.end)
        if pins is not None and (
            not pins[i] or pins[i][-1][1] != core.kv.num_pinned_blocks / core.kv.num_blocks
        ):
            pins[i].append((out.end, core.kv.num_pinned_blocks / core.kv.num_blocks))
        if out.plan.is_empty and not out.plan.swap_in_ids and out.end == out.start:
            # Nothing could run and no time passed: what waits needs KV that a request stopped for its
            # migration still holds. The replica sleeps until the controller or an arrival wakes it.
            # (A swap-in that copied nothing, its blocks all on the device, runs in the next step.)
            continue
        if core.has_unfinished():
            wake(i)
    bar.close()
    cores = [rep.core for rep in reps]
    # Nothing is left to wake a replica: one still holding requests would have served them no matter how
    # long the simulation ran (a scheduler that can plan nothing on an idle engine).
    stalled = [i for i, c in enumerate(cores) if c.has_unfinished()]
    assert not stalled, f"replica {stalled[0]} stalled with requests it never scheduled"
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
        num_needed_tokens=needed,
        num_prompt_tokens=prompt_tokens,
        num_decode_tokens=decode_tokens,
        migrations=migrations,
        prefix_cache_queries=sum(c.kv.pool.num_cache_queries for c in cores),
        prefix_cache_hits=sum(c.kv.pool.num_cache_hits for c in cores),
        num_polls=polls,
        pinned_kv=pins or [],
        cores=cores,
    )
