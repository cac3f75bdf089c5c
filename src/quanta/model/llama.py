"""Llama-family decoder (Llama, Mistral, Qwen2) over a flat batch of tokens with paged KV.

q/k/v and gate/up projections are fused into one matmul each; the loader concatenates the checkpoint's
separate weights. Numerics follow `transformers` (RMSNorm in float32, rotate-half rotary embedding).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quanta.model.attention import AttentionBackend, TorchPagedAttention
from quanta.model.config import ModelConfig, ModelLoadError, rope_kind


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels: ModuleType | None = None  # quanta.model.cpu_kernels, set by LlamaModel.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        # Normalize in float32, scale in the model dtype: the order transformers uses.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)

    def add_norm(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, norm(x + y)): the residual add and the next norm, one kernel where one exists."""
        fused = getattr(self.kernels, "add_rms_norm", None)
        if fused is not None:
            return fused(x, y, self.weight, self.eps)
        s = x + y
        return s, self(s)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling
    kind = rope_kind(scaling)
    if kind == "default":
        return inv_freq
    assert scaling is not None
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        return _yarn_inv_freq(cfg, scaling)
    raise ModelLoadError(f"unsupported rope_scaling type {kind!r}")


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor on cos and sin (transformers' `attention_scaling`): YaRN's mscale, 1 otherwise."""
    scaling = cfg.rope_scaling
    if rope_kind(scaling) != "yarn":
        return 1.0
    assert scaling is not None
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, _ = _yarn_lengths(cfg, scaling)
    # Both or neither, as transformers reads them: one alone leaves the paper's default.
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """The YaRN paper's attention temperature, 0.1 * mscale * ln(factor) + 1 (eq. 21)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_lengths(cfg: ModelConfig, scaling: dict[str, Any]) -> tuple[float, float]:
    """(factor, original context length). ModelConfig.from_hf_dict fills both in; a config built in code
    gets transformers' defaults: the context is the original length, the factor the ratio of the two."""
    old_len = scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = scaling.get("factor")
    return (cfg.max_position_embeddings / old_len if factor is None else factor), old_len


def _yarn_inv_freq(cfg: ModelConfig, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): high frequencies kept, low ones divided by the factor, a linear ramp
    between. Every operation is transformers' own, in its order and dtype, so the tables are bitwise
    equal to its tables (a greedy token can flip on a last-bit difference)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    factor, old_len = _yarn_lengths(cfg, scaling)
    # transformers reads 0 as unset too (`or`).
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        """The dimension whose wavelength turns `rotations` times over the original context."""
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        # Built on the CPU even where the model is made on the meta device (as the loader does): meta
        # ops import torch._dynamo, seconds of start-up, and these tables are computed, not loaded.
        positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, rope_inv_freq(cfg))
        emb = torch.cat((freqs, freqs), dim=-1)
        # Scaled in float32 before any cast, as transformers scales its cos and sin.
        scale = rope_attention_factor(cfg)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the step's positions, [T, 1, D]; computed once per step, used by every layer."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kernels: ModuleType | None
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rope
    if kernels is not None:
        if not getattr(kernels, "ROTARY_TAKES_STRIDES", False):
            q, k = q.contiguous(), k.contiguous()
        kernels.rotary_inplace(q, k, cos.squeeze(1), sin.squeeze(1))
        return q, k
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.intermediate_size = cfg.intermediate_size
        self.attn = attn
        self.kernels: ModuleType | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: Any,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (residual stream, MLP output): the caller adds the two, fused with the next layer's
        input norm. `pending` is the previous layer's MLP output, not yet added to x."""
        t = x.shape[0]
        if pending is None:
            h = self.input_layernorm(x)
        else:
            x, h = self.input_layernorm.add_norm(x, pending)
        qkv = self.qkv_proj(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, rope, self.kernels)
        o = self.attn.forward(q, k, v, kv_cache[0], kv_cache[1], meta)
        x, h = self.post_attention_layernorm.add_norm(x, self.o_proj(o.reshape(t, self.q_size)))
        gate_up = self.gate_up_proj(h)
        if self.kernels is not None:
            return x, self.down_proj(self.kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return x, self.down_proj(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, block_size: int, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn: AttentionBackend
        self.attn = attn = TorchPagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size)
        # An explicit (uninitialized) weight skips Embedding's random init, which on the meta device
        # imports torch._dynamo: 2-3 s of start-up for values the loader overwrites anyway.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, attn) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def set_attention(self, attn: AttentionBackend) -> None:
        self.attn = attn
        for layer in self.layers:
            layer.attn = attn

    def use_kernels(self, kernels: ModuleType | None) -> None:
        """Route norms, rotary and SiLU (and the torch backend's decode attention) through fused kernels:
        `quanta.model.cpu_kernels` (C++) or `quanta.model.triton_kernels` (CUDA); None: portable torch."""
        self.attn.kernels = kernels
        for module in self.modules():
            if isinstance(module, (RMSNorm, DecoderLayer)):
                module.kernels = kernels

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: Any,
    ) -> torch.Tensor:
        """Hidden states of every token, final norm not applied (logits are computed for few rows)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.tables(positions, x.dtype)
        pending = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, pending = layer(x, rope, kv_cache, meta, pending)
        return x if pending is None else x + pending

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()
