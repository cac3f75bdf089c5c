"""Roofline cost model: how long one step plan takes on a GPU, from the model's shape and the GPU's specs.

Per step: every layer's linear layers (weights read once, FLOPs per token), attention (per request: its
new tokens against its context, reading its KV), the LM head for the sampled rows, tensor-parallel
all-reduces, and a fixed overhead. Each part costs max(FLOPs / achieved FLOP/s, bytes / achieved
bandwidth); the efficiency factors are calibrated from profiles measured by the real engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quanta.model.config import ModelConfig
from quanta.sched.plan import StepPlan
from quanta.sim.hardware import GPUSpec


@dataclass(slots=True)
class Efficiency:
    """Achieved fraction of peak, and fixed costs. Defaults are typical of vLLM-class engines on GPUs."""

    matmul: float = 0.7  # of peak FLOP/s for the linear layers
    attention: float = 0.5  # of peak FLOP/s for attention math
    memory: float = 0.8  # of HBM bandwidth
    link: float = 0.7  # of interconnect bandwidth
    step_overhead: float = 2e-3  # seconds per step: scheduling, launches, sampling
    allreduce_latency: float = 10e-6  # seconds per all-reduce
    copy_latency: float = 10e-6  # seconds per host<->device copy call (launch and DMA set-up)


@dataclass(slots=True)
class StepCost:
    linear: float
    attention: float
    lm_head: float
    communication: float
    overhead: float

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.lm_head + self.communication + self.overhead


class CostModel:
    def __init__(
        self,
        model: ModelConfig,
        gpu: GPUSpec,
        tp: int = 1,
        dtype_bytes: int = 2,
        efficiency: Efficiency | None = None,
    ) -> None:
        if tp < 1 or model.num_heads % tp or (model.num_kv_heads % tp and tp % model.num_kv_heads):
            raise ValueError(
                f"tensor parallelism {tp} does not split the model's {model.num_heads} heads / "
                f"{model.num_kv_heads} KV heads evenly"
            )
        self.model, self.gpu, self.tp, self.dtype_bytes = model, gpu, tp, dtype_bytes
        self.eff = efficiency or Efficiency()
        h, i = model.hidden_size, model.intermediate_size
        q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
        # Per layer, per GPU: multiply-accumulates per token = weight elements of q/k/v/o and the MLP.
        self.layer_weight_elems = (h * (q + 2 * kv) + q * h + 3 * h * i) / tp
        self.lm_head_elems = model.vocab_size * h / tp
        # Attention FLOPs per (query, key) pair per layer per GPU: QK^T and PV, 2 FLOPs per MAC each.
        self.attn_flops_per_pair = 4 * q / tp
        # KV bytes per token per layer per GPU: K and V of its share of KV heads (at least one: with
        # tp > KV heads, heads are replicated).
        kv_heads_per_gpu = max(model.num_kv_heads // tp, 1)
        self.kv_bytes_per_token_layer = 2 * kv_heads_per_gpu * model.head_dim * dtype_bytes

    # ---- sizes ---------------------------------------------------------------------------------
    def weight_bytes_per_gpu(self) -> float:
        m = self.model
        embed = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2) / self.tp
        return (m.num_layers * self.layer_weight_elems + embed) * self.dtype_bytes

    def kv_bytes_per_token(self) -> float:
        """Per GPU, all layers."""
        return self.model.num_layers * self.kv_bytes_per_token_layer

    def kv_capacity_tokens(
        self, gpu_memory_utilization: float = 0.9, activation_reserve: float = 0.05
    ) -> int:
        """Tokens of KV one GPU holds once weights and an activation reserve are taken out."""
        free = (
            self.gpu.mem_bytes * (gpu_memory_utilization - activation_reserve) - self.weight_bytes_per_gpu()
        )
        if free <= 0:
            raise ValueError(
                f"{self.model.architecture} weights ({self.weight_bytes_per_gpu() / 2**30:.1f} GiB per GPU) "
                f"do not fit on {self.gpu.name} with tp={self.tp}"
            )
        return int(free // self.kv_bytes_per_token())

    # ---- time ----------------------------------------------------------------------------------
    def _roofline(self, flops: float, nbytes: float, compute_eff: float) -> float:
        compute = flops / (self.gpu.bf16_flops * compute_eff)
        memory = nbytes / (self.gpu.mem_bandwidth * self.eff.memory)
        if isinstance(compute, np.ndarray):  # many steps at once (decode_times): the same operations
            return np.maximum(compute, memory)
        return max(compute, memory)

    def step_work(self, batch: list[tuple[int, int]], num_sampled: int) -> dict[str, tuple[float, float]]:
        """(FLOPs, bytes) of each part of a step, all layers together: linear, attention, lm_head."""
        return dict(zip(("linear", "attention", "lm_head"), self._work(*_totals(batch), num_sampled)))

    def _work(self, tokens: int, pairs: int, kv_tokens: int, num_sampled: int) -> tuple[tuple[float, float], ...]:
        """(FLOPs, bytes) of linear, attention and lm_head, from the batch's totals."""
        layers, db = self.model.num_layers, self.dtype_bytes
        kv_read = kv_tokens * self.kv_bytes_per_token_layer
        return (
            (
                layers * 2 * tokens * self.layer_weight_elems,
                layers * (self.layer_weight_elems * db + 2 * tokens * self.model.hidden_size * db),
            ),
            (layers * self.attn_flops_per_pair * pairs, layers * kv_read),
            (2 * num_sampled * self.lm_head_elems, self.lm_head_elems * db if num_sampled else 0.0),
        )

    def step_cost(self, batch: list[tuple[int, int]], num_sampled: int) -> StepCost:
        """batch: (tokens already in the KV cache, new tokens) per scheduled request."""
        if not batch:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0)
        return self._cost(*_totals(batch), num_sampled)

    def _cost(self, tokens: int, pairs: int, kv_tokens: int, num_sampled: int) -> StepCost:
        """A step's cost from the batch's totals: everything the roofline depends on."""
        layers, db = self.model.num_layers, self.dtype_bytes
        linear_work, attention_work, lm_head_work = self._work(tokens, pairs, kv_tokens, num_sampled)
        # Every layer runs the same shapes: the roofline of the sum over layers is the sum of theirs.
        linear = self._roofline(*linear_work, self.eff.matmul)
        attention = self._roofline(*attention_work, self.eff.attention)
        lm_head = self._roofline(*lm_head_work, self.eff.matmul)
        communication = 0.0
        if self.tp > 1:
            # Two all-reduces of the hidden states per layer; a ring moves 2(tp-1)/tp of the data.
            nbytes = tokens * self.model.hidden_size * db * 2 * (self.tp - 1) / self.tp
            per = self.eff.allreduce_latency + nbytes / (self.gpu.link_bandwidth * self.eff.link)
            communication = 2 * layers * per
        return StepCost(linear, attention, lm_head, communication, self.eff.step_overhead)

    def decode_times(self, num_seqs: int, context_tokens: np.ndarray) -> np.ndarray:
        """Steps in which `num_seqs` requests decode one token each after `context_tokens[j]` cached
        tokens in all: for each, to the last bit, what plan_time gives for that plan (the same
        operations in the same order, elementwise), so that the simulator prices runs of such steps
        without building them."""
        # A decode after c cached tokens: 1 new token, c + 1 (query, key) pairs, c + 1 KV tokens read.
        total = np.asarray(context_tokens, dtype=np.int64) + num_seqs
        # Only attention depends on the context; the sum keeps StepCost.total's order.
        return self._cost(num_seqs, total, total, num_seqs).total  # type: ignore[arg-type,return-value]

    def chunk_time(self, num_decodes: int, decode_context: int, cached: int, new: int, sample: bool) -> float:
        """A step in which `num_decodes` requests decode one token each after `decode_context` cached
        tokens in all, and one more computes `new` tokens after `cached` (sampling when `sample`): to the
        last bit what plan_time gives for that plan (the batch's integer totals, then the same operations)."""
        decode_total = decode_context + num_decodes  # each decode reads its context and its new token
        tokens = num_decodes + new
        pairs = decode_total + new * cached + new * (new + 1) // 2
        return self._cost(tokens, pairs, decode_total + cached + new, num_decodes + sample).total

    def copy_time(self, num_runs: int, num_tokens: int) -> float:
        """Host<->device KV copies: one call per run of contiguous blocks per layer per K/V tensor, each
        costing a fixed latency, plus the bytes over the host link."""
        calls = num_runs * 2 * self.model.num_layers
        return (
            calls * self.eff.copy_latency
            + num_tokens * self.kv_bytes_per_token() / self.gpu.host_link_bandwidth
        )

    def plan_time(self, plan: StepPlan) -> float:
        batch = [(s.num_computed_tokens, s.num_new_tokens) for s in plan.scheduled]
        return self.step_cost(batch, sum(1 for s in plan.scheduled if s.sample)).total


def _totals(batch: list[tuple[int, int]]) -> tuple[int, int, int]:
    """New tokens, (query, key) pairs and KV tokens read of a batch of (cached, new) token counts."""
    tokens = sum(n for _, n in batch)
    # New token i of a chunk starting after c cached tokens attends to c + i + 1 keys.
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in batch)
    kv_tokens = sum(c + n for c, n in batch)
    return tokens, pairs, kv_tokens
