"""Prefill-prioritizing scheduling of vLLM (2023) and Orca, the baseline Sarathi-Serve compares against.

Waiting prompts are admitted whole as soon as they fit the batched-token limit and the KV pool; a step
that carries any prefill runs no decodes, so running requests stall while new prompts are processed.
"""

from __future__ import annotations

from quanta.config import SchedulerConfig
from quanta.request import Request
from quanta.sched.policy import Policy, register


@register
class PrefillFirstPolicy(Policy):
    name = "prefill-first"
    decodes_wait_for_prefill = True

    def __init__(self, config: SchedulerConfig) -> None:
        if config.max_num_batched_tokens < config.max_model_len:
            raise ValueError(
                f"prefill-first runs whole prompts, so max_num_batched_tokens ({config.max_num_batched_tokens})"
                f" must be at least max_model_len ({config.max_model_len})"
            )
        super().__init__(config)

    def prefill_tokens(self, req: Request, num_remaining: int, budget_left: int) -> int:
        return num_remaining if num_remaining <= budget_left else 0
