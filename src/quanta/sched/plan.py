"""The step plan: what the scheduler asks an executor to run in one iteration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from quanta.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    num_computed_tokens: int  # tokens already in the KV cache before this step (the chunk's start position)
    block_ids: list[int]  # the request's block table (shared with the KV manager; read it during the step)
    sample: bool  # the chunk reaches the request's last token, so a new token is sampled after it

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def context_len(self) -> int:
        return self.num_computed_tokens + self.num_new_tokens


@dataclass(slots=True)
class StepPlan:
    step_id: int
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    # Requests that left the engine since the previous plan: executors drop their per-request state.
    finished_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0
    # Swaps as contiguous runs (src block, dst block, number of blocks). Swap-outs (device -> host) run
    # before the step's forward; swap-ins (host -> device) may finish in a later step: the executor reports
    # the requests whose swap-in is done, and only those are scheduled again.
    swap_out: list[tuple[int, int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int, int]] = field(default_factory=list)
    swap_in_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def has_swaps(self) -> bool:
        return bool(self.swap_out or self.swap_in)

    def summary(self) -> tuple:
        """A comparable description of the plan (for replay tests and logs)."""
        return (
            tuple((s.request_id, s.num_computed_tokens, s.num_new_tokens, s.sample) for s in self.scheduled),
            tuple(self.preempted_ids),
        )


@dataclass(slots=True)
class TokenBudget:
    """Tokens one step may still process."""

    left: int

    def take(self, n: int) -> None:
        assert 0 <= n <= self.left, f"taking {n} tokens from a budget of {self.left}"
        self.left -= n

    def give_back(self, n: int) -> None:
        """Tokens of a request taken back out of the step."""
        assert n >= 0
        self.left += n


def first_sample_step(prompt: Request, chunks: Sequence[int]) -> int | None:
    """In a run whose steps compute `chunks` of `prompt`, one a step: the step in which it samples its
    first token (its last chunk's, where they complete the prompt), or None (they do not)."""
    return len(chunks) - 1 if prompt.num_computed_tokens + sum(chunks) == prompt.num_tokens else None
