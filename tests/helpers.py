"""Test helpers: the scheduler alone (constant-time SimExecutor, virtual clock), and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import VirtualClock
from quanta.engine.core import EngineCore
from quanta.executor.sim_executor import ConstantStepTime, SimExecutor
from quanta.request import Request
from quanta.sampling_params import SamplingParams

STEP_TIME = 0.01


def null_engine(
    policy: str = "sarathi",
    budget: int = 64,
    num_blocks: int = 256,
    max_num_seqs: int | None = None,  # default: 128, or the budget when smaller
    max_model_len: int = 512,
    block_size: int = 4,
    caching: bool = True,
) -> EngineCore:
    executor = SimExecutor(ConstantStepTime(STEP_TIME), num_blocks, token_id=1, record=True)
    return EngineCore(
        executor,
        VirtualClock(),
        SchedulerConfig(policy, budget, max_num_seqs or min(128, budget), max_model_len),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
        check_integrity=True,
    )


def make_request(
    rid: str, prompt_len: int, max_tokens: int, arrival: float = 0.0, first_token: int = 10
) -> Request:
    return Request(
        rid,
        list(range(first_token, first_token + prompt_len)),
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        arrival_time=arrival,
    )


def run_to_end(core: EngineCore, max_steps: int = 100_000) -> int:
    steps = 0
    while core.has_unfinished():
        core.step()
        steps += 1
        assert steps < max_steps, "engine made no progress"
    return steps


def run_cli(*args: str, env_cache: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `quanta ARGS` as a user would, in a fresh process (QUANTA_CACHE: where its default model goes)."""
    env = {**os.environ, "QUANTA_CACHE": str(env_cache)} if env_cache else None
    return subprocess.run(
        [sys.executable, "-m", "quanta.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
