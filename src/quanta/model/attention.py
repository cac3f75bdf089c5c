"""Paged attention. `TorchPagedAttention` is the portable backend (CPU, or any torch device).

Batch layout: the step's tokens are flat. Decodes (one token, with earlier context) come first and are
attended in one padded call; prefill chunks follow, one call each. A layer writes the KV of every new
token into the cache before any query reads it, so a chunk sees its own earlier chunks and blocks that
another request of the same step is filling (prefix sharing within a step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    num_tokens: int
    context_len: int  # tokens in the cache after this step, including the chunk
    block_table: torch.Tensor  # [num_blocks] long


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long: cache slot of each new token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] long, padded with 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool: key is visible
    prefills: list[PrefillChunk]


class TorchPagedAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.gqa = num_heads != num_kv_heads

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, k)
        flat_v.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            assert meta.decode_block_tables is not None
            bt = meta.decode_block_tables
            # [nd, max_blocks, bs, Hkv, D] -> [nd, Hkv, L, D]
            kd = k_cache[bt].flatten(1, 2).transpose(1, 2)
            vd = v_cache[bt].flatten(1, 2).transpose(1, 2)
            qd = q[:nd].unsqueeze(2)  # [nd, H, 1, D]
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=self.gqa)
            out[:nd] = od.squeeze(2)
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            qc = q[rows].transpose(0, 1)  # [H, n, D]
            if chunk.context_len == chunk.num_tokens:  # no earlier context: the fresh KV is the context
                kc, vc = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                oc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=self.gqa)
            else:
                slots = _slots(chunk.block_table, chunk.context_len, self.block_size)
                kc = flat_k[slots].transpose(0, 1)
                vc = flat_v[slots].transpose(0, 1)
                # Query i sits at position context_len - num_tokens + i and sees keys up to it.
                offset = chunk.context_len - chunk.num_tokens
                qpos = torch.arange(offset, chunk.context_len, device=q.device)
                kpos = torch.arange(chunk.context_len, device=q.device)
                mask = kpos[None, :] <= qpos[:, None]
                oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, enable_gqa=self.gqa)
            out[rows] = oc.transpose(0, 1)
        return out


def _slots(block_table: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(num_tokens, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size
