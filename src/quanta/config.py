"""Validated configuration dataclasses. Pure Python: the scheduler and simulator read these too."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from quanta.kv.block_pool import check_hash_algo


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    # Number of KV blocks. None: the executor sizes the pool from `kv_cache_memory_gb`.
    num_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    enable_prefix_caching: bool = True
    # Host memory for preemption by swapping: num_cpu_blocks, or sized from swap_space_gb when None.
    swap_space_gb: float = 0.0
    num_cpu_blocks: int | None = None
    # Allocate a request's blocks contiguously where possible, so a swap is a few large copies.
    block_groups: bool = True
    # Prefix-cache hits only between requests of the same tenant (on top of per-request cache_salt).
    prefix_cache_per_tenant: bool = False
    # How full blocks are keyed in the prefix cache (quanta.kv.block_pool.HASH_ALGOS): "sha256" resists
    # crafted collisions; "tuple" is Python's int-tuple hash, ~10x cheaper, for simulated or trusted prompts.
    prefix_cache_hash: str = "sha256"
    # The caller vouches that no two requests share a block of tokens (a simulator's synthetic prompts):
    # the same hits and block choices, without hashing blocks no other request could look up
    # (KVCacheManager's `private_prompts`). Never for served traffic.
    private_prompts: bool = False

    def __post_init__(self) -> None:
        check_hash_algo(self.prefix_cache_hash)
        if self.swap_space_gb < 0 or (self.num_cpu_blocks is not None and self.num_cpu_blocks < 0):
            raise ValueError("swap_space_gb and num_cpu_blocks must not be negative")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if not 0 < self.kv_cache_memory_gb < math.inf:  # (nan fails this too)
            raise ValueError(f"kv_cache_memory_gb must be a positive, finite number, got {self.kv_cache_memory_gb}")


@dataclass(slots=True)
class SchedulerConfig:
    policy: str = "sarathi"
    # Token budget per step (Sarathi-Serve's tau). Prefill-first uses it as max batched tokens.
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    max_model_len: int = 2048
    # How a preempted request gives up its KV: "recompute" (drop it) or "swap" (copy it to host memory).
    preemption_mode: str = "recompute"
    # Policy-specific settings, e.g. {"aging_s": 30} (priority) or {"tenant_weights": {"a": 2}} (vtc, wfq).
    policy_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running decode needs a token of the step's budget: with fewer tokens than sequences
            # the last decodes would be skipped step after step (vLLM rejects this too).
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}): raise the token budget or lower max_num_seqs"
            )
