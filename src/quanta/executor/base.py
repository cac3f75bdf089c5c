"""The executor interface: carry out a step plan and report what it produced and how long it took."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from quanta.request import Request
from quanta.sched.plan import StepPlan


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities at one position: the chosen token first, then the top alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # 1 = most likely


@dataclass(slots=True)
class StepResult:
    sampled_token_ids: dict[str, int]
    elapsed: float  # seconds: measured (model) or predicted (cost model)
    # request id -> logprobs of the sampled token and its top alternatives
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request id -> (index of the first prompt token covered, entries for consecutive prompt tokens)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # Requests whose swap-in (of this or an earlier plan) has landed: they may be scheduled again.
    swapped_in_ids: list[str] = field(default_factory=list)


class Executor(Protocol):
    @property
    def num_kv_blocks(self) -> int:
        """Size of the KV pool this executor can hold; the KV manager is built to match."""
        ...

    def execute(self, plan: StepPlan) -> StepResult: ...


class DecodeRunExecutor(Executor, Protocol):
    """An executor that can also price a run of pure-decode steps without plans (the simulator's), so
    that EngineCore.decode_run can skip re-planning steps that cannot change."""

    token_id: int  # what every decode samples, short of a request's EOS

    def decode_run(
        self, requests: Sequence[Request], limit: int, chunks: Sequence[int] = ()
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Durations of up to `limit` such steps (fewer where one would differ; with `chunks`, the last
        request computes those prompt chunks in the first steps), and the tokens sampled in the last one
        where they are not token_id (request id -> token: an EOS)."""
        ...
