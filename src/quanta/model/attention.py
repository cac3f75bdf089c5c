"""Paged attention. `TorchPagedAttention` is the portable backend (CPU, or any torch device).

Batch layout: the step's tokens are flat. Decodes (one token, with earlier context) come first and are
attended in one padded call; prefill chunks follow, one call each (the C++ kernels take all decodes
in one call and all chunks in another, reading K/V in place from the paged cache). A layer writes the KV of every new
token into the cache before any query reads it, so a chunk sees its own earlier chunks and blocks that
another request of the same step is filling (prefix sharing within a step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(slots=True)
class SeqSlice:
    """One sequence's part of a step: its new tokens are the last `num_tokens` of `context_len`."""

    num_tokens: int
    context_len: int
    block_ids: list[int]


class AttentionBackend(Protocol):
    """What the model needs from an attention backend (torch here, Triton in triton_attention.py)."""

    kernels: Any

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]: ...

    def build_metadata(
        self, seqs: list[SeqSlice], num_decodes: int, slots: np.ndarray, device: torch.device, dtype: torch.dtype
    ) -> Any:
        """Metadata for a step whose first `num_decodes` sequences are decodes; slots: [T] cache slot of
        each new token (block * block_size + offset), in batch order."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor: ...


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    num_tokens: int
    context_len: int  # tokens in the cache after this step, including the chunk
    block_table: torch.Tensor  # [num_blocks] long


@dataclass(slots=True)
class DecodeGroup:
    """Decodes of similar context length, attended together (padded to the longest of the group)."""

    start: int  # first row in the flat batch
    num: int
    gather_index: torch.Tensor  # rows of the (block, head) cache view, ordered (request, head, block)
    padding: torch.Tensor  # [num, 1, 1, max_blocks * block_size] bool: key is padding


@dataclass(slots=True)
class AttentionMetadata:
    # Portable path: [num_tokens * num_kv_heads] long, row of each new (token, kv head) in the cache viewed
    # as [num_blocks * num_kv_heads * block_size, head_dim]; one index_copy_ per cache writes the step's KV.
    # C++ kernel path: [num_tokens] long, each new token's slot (block * block_size + offset).
    slot_rows: torch.Tensor
    prefills: list[PrefillChunk]
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # portable path
    decode_tables: torch.Tensor | None = None  # C++ kernel path: [num_decodes, max_blocks] long, 0-padded
    decode_lens: torch.Tensor | None = None  # C++ kernel path: [num_decodes] long
    # C++ kernel path: every prefill chunk in one call. Tables [chunks, max_blocks] long, 0-padded;
    # info [chunks, 3] long: first row in the batch, new tokens, context length.
    prefill_tables: torch.Tensor | None = None
    prefill_info: torch.Tensor | None = None


class TorchPagedAttention:
    """KV cache layout per layer: K and V each [num_blocks, num_kv_heads, block_size, head_dim].

    Viewed as [num_blocks * num_kv_heads, block_size, head_dim], one (block, head) is a contiguous piece,
    so a single `index_select` gathers every decode's context already as [request, head, token, dim].
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        kernels: ModuleType | None = None,
    ) -> None:
        self.kernels = kernels  # quanta.model.cpu_kernels: decode attention straight from the paged cache
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.gqa = num_heads != num_kv_heads
        self.scale = head_dim**-0.5

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    def build_metadata(
        self, seqs: list[SeqSlice], num_decodes: int, slots: np.ndarray, device: torch.device, dtype: torch.dtype
    ) -> AttentionMetadata:
        """Decodes come first, sorted by context length (ascending) so that grouping pads little."""
        slots = slots.astype(np.int64)
        if self.kernels is not None:
            rows = slots  # write_kv finds each head's row itself
        else:
            blocks, offsets = slots // self.block_size, slots % self.block_size
            heads = np.arange(self.num_kv_heads, dtype=np.int64)
            rows = ((blocks[:, None] * self.num_kv_heads + heads[None, :]) * self.block_size + offsets[:, None]).ravel()
        chunks: list[PrefillChunk] = []
        meta = AttentionMetadata(torch.from_numpy(rows).to(device), chunks)
        if self.kernels is not None:
            self._plan_prefills(seqs[num_decodes:], num_decodes, device, meta)
        else:
            row = num_decodes
            for s in seqs[num_decodes:]:
                table = torch.tensor(s.block_ids, device=device)
                chunks.append(PrefillChunk(row, s.num_tokens, s.context_len, table))
                row += s.num_tokens
        if num_decodes:
            decodes = seqs[:num_decodes]
            self._plan_decodes([s.block_ids for s in decodes], [s.context_len for s in decodes], device, meta)
        return meta

    def _plan_prefills(
        self, prefills: list[SeqSlice], first_row: int, device: torch.device, meta: AttentionMetadata
    ) -> None:
        if not prefills:
            return
        width = max(-(-s.context_len // self.block_size) for s in prefills)
        tables = np.zeros((len(prefills), width), dtype=np.int64)
        info = np.empty((len(prefills), 3), dtype=np.int64)
        row = first_row
        for i, s in enumerate(prefills):
            used = s.block_ids[: -(-s.context_len // self.block_size)]
            tables[i, : len(used)] = used
            info[i] = (row, s.num_tokens, s.context_len)
            row += s.num_tokens
        meta.prefill_tables = torch.from_numpy(tables).to(device)
        meta.prefill_info = torch.from_numpy(info).to(device)

    def _plan_decodes(
        self,
        block_tables: list[list[int]],
        context_lens: list[int],
        device: torch.device,
        meta: AttentionMetadata,
    ) -> None:
        if self.kernels is not None:
            width = max(len(t) for t in block_tables)
            meta.decode_tables = torch.tensor(
                [t + [0] * (width - len(t)) for t in block_tables], device=device
            )
            meta.decode_lens = torch.tensor(context_lens, device=device)
        else:
            meta.decode_groups = self._group_decodes(block_tables, context_lens, device)

    def _group_decodes(
        self, block_tables: list[list[int]], context_lens: list[int], device: torch.device
    ) -> list[DecodeGroup]:
        """Group decodes (sorted by context length, ascending) so that padding stays small.

        A group closes when the next context is over 1.5x the group's shortest and the group already has
        8 members: padding then costs at most a third of the gathered KV, and few groups mean few calls.
        """
        groups: list[DecodeGroup] = []
        begin = 0
        n = len(context_lens)
        for i in range(1, n + 1):
            if i == n or (i - begin >= 8 and context_lens[i] > 1.5 * context_lens[begin]):
                groups.append(self._decode_group(begin, block_tables[begin:i], context_lens[begin:i], device))
                begin = i
        return groups

    def _decode_group(
        self, start: int, tables: list[list[int]], context_lens: list[int], device: torch.device
    ) -> DecodeGroup:
        width = max(len(t) for t in tables)
        flat: list[int] = []
        for t in tables:
            flat += t
            flat += [0] * (width - len(t))
        blocks = torch.tensor(flat, device=device).view(len(tables), width)
        heads = torch.arange(self.num_kv_heads, device=device)
        index = (blocks[:, None, :] * self.num_kv_heads + heads[None, :, None]).flatten()
        ctx = torch.tensor(context_lens, device=device)
        padding = torch.arange(width * self.block_size, device=device)[None, :] >= ctx[:, None]
        return DecodeGroup(start, len(tables), index, padding[:, None, None, :])

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        d = self.head_dim
        kernels = self.kernels
        if kernels is not None:
            kernels.write_kv(k, v, k_cache, v_cache, meta.slot_rows)  # k, v may be strided views of qkv
        else:
            k_cache.view(-1, d).index_copy_(0, meta.slot_rows, k.reshape(-1, d))
            v_cache.view(-1, d).index_copy_(0, meta.slot_rows, v.reshape(-1, d))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.decode_tables is not None:
            assert kernels is not None and meta.decode_lens is not None
            nd = meta.decode_tables.shape[0]
            # q may be a strided view of qkv; the kernel writes the decodes' rows of `out` in place.
            kernels.paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.decode_tables, meta.decode_lens, self.scale, out=out[:nd]
            )
        if meta.prefill_tables is not None:
            assert kernels is not None and meta.prefill_info is not None
            # Causal attention of every chunk over its cached context (just written, above), GQA without
            # copying K/V per query head; writes the chunks' rows of `out`.
            kernels.paged_prefill_attention(
                q, k_cache, v_cache, meta.prefill_tables, meta.prefill_info, self.scale, out=out
            )
        for group in meta.decode_groups:
            rows = slice(group.start, group.start + group.num)
            out[rows] = self._decode(q[rows], k_cache, v_cache, group)
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            qc = q[rows].transpose(0, 1)  # [H, n, D]
            if chunk.context_len == chunk.num_tokens:  # no earlier context: the fresh KV is the context
                kc, vc = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                mask = None
            else:
                kc, vc = self._gather(k_cache, chunk), self._gather(v_cache, chunk)
                # Query i sits at position context_len - num_tokens + i and sees keys up to it.
                offset = chunk.context_len - chunk.num_tokens
                qpos = torch.arange(offset, chunk.context_len, device=q.device)
                kpos = torch.arange(chunk.context_len, device=q.device)
                mask = kpos[None, :] <= qpos[:, None]
            if self.gqa:  # CPU's flash kernel takes neither enable_gqa nor 3-d inputs: both fall back to math
                group = self.num_heads // self.num_kv_heads
                kc, vc = kc.repeat_interleave(group, 0), vc.repeat_interleave(group, 0)
            oc = F.scaled_dot_product_attention(
                qc[None], kc[None], vc[None], attn_mask=mask, is_causal=mask is None
            )
            out[rows] = oc[0].transpose(0, 1)
        return out

    def _gather(self, cache: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        """A request's context as [Hkv, context_len, D]."""
        num_blocks = -(-chunk.context_len // self.block_size)
        blocks = cache.index_select(0, chunk.block_table[:num_blocks])  # [nb, Hkv, bs, D]
        return blocks.transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)[:, : chunk.context_len]

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup
    ) -> torch.Tensor:
        """One query per request against its padded context, as two batched matmuls over (request, kv head).

        The query heads that share a KV head are stacked as rows, so GQA needs no copy of K/V.
        (CPU's fused SDPA is slow for single-token queries.)
        """
        nd, hkv, d = q.shape[0], self.num_kv_heads, self.head_dim
        length = group.padding.shape[-1]
        k = k_cache.view(-1, self.block_size, d).index_select(0, group.gather_index).view(nd, hkv, length, d)
        v = v_cache.view(-1, self.block_size, d).index_select(0, group.gather_index).view(nd, hkv, length, d)
        qg = q.view(nd, hkv, self.num_heads // hkv, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * self.scale  # [nd, Hkv, G, L]
        scores.masked_fill_(group.padding, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, v).reshape(nd, self.num_heads, d)
