"""Same code, proven: the simulator replays the real engine's schedule step for step."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.arrivals import run_arrivals
from quanta.engine.clock import VirtualClock, WallClock
from quanta.engine.core import EngineCore
from quanta.executor.model_executor import ModelExecutor
from quanta.executor.sim_executor import ReplayStepTime, SimExecutor
from quanta.request import Request
from quanta.sampling_params import SamplingParams


def trace() -> list[Request]:
    g = torch.Generator().manual_seed(9)
    reqs = []
    for i in range(14):
        n = int(torch.randint(20, 120, (1,), generator=g))
        prompt = torch.randint(3, 512, (n,), generator=g).tolist()
        params = SamplingParams(
            temperature=0.0, max_tokens=int(torch.randint(5, 40, (1,), generator=g)), ignore_eos=True
        )
        # Bursts and gaps: some requests arrive together, some while the engine is idle.
        reqs.append(
            Request(f"r{i}", prompt, params, arrival_time=0.04 * (i // 2) + (0.3 if i >= 10 else 0.0))
        )
    return reqs


def test_simulator_replays_the_real_engine(llama_dir: Path) -> None:
    sched = SchedulerConfig("sarathi", max_num_batched_tokens=48, max_num_seqs=6, max_model_len=256)
    cache = CacheConfig(block_size=16, num_blocks=16)  # small enough to preempt
    real = EngineCore(
        ModelExecutor(llama_dir, cache, 256, 6, dtype="float32"),
        WallClock(),
        sched,
        cache,
        check_integrity=True,
    )
    recorded = run_arrivals(real, trace())
    assert real.scheduler.num_preemptions > 0 and len(recorded) > 20

    # Each step "takes" the wall time from its admission check to the next one (execution, bookkeeping
    # and idle waits included), so the virtual clock reads what the wall clock read at every check.
    checks = [r.admit_time for r in recorded]
    durations = [b - a for a, b in itertools.pairwise(checks)] + [recorded[-1].end - recorded[-1].start]
    sim = EngineCore(
        SimExecutor(ReplayStepTime(durations), num_blocks=16),
        VirtualClock(start=checks[0]),
        sched,
        cache,
        check_integrity=True,
    )
    replayed = run_arrivals(sim, trace())
    assert [r.summary for r in replayed] == [r.summary for r in recorded]
