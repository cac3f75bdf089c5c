"""Sarathi-Serve stall-free batching (OSDI 2024).

Each step: every running decode gets its token first, then partly-done prompts continue, then new
requests are admitted, all inside one token budget; prompts are split into chunks that fit what is
left. Decodes never wait for a prefill. This is the base Policy's behaviour, named.
"""

from __future__ import annotations

from quanta.sched.policy import Policy, register


@register
class SarathiPolicy(Policy):
    name = "sarathi"
