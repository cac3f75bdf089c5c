"""Paged attention in Triton: the CUDA backend (also runs on CPU under TRITON_INTERPRET=1, for tests).

One kernel serves decodes and prefill chunks with a cached prefix. A program takes a tile of one
sequence's query tokens times the query heads that share a KV head (GQA rows stacked, so K/V are read
once per KV head) and streams that sequence's keys block by block with an online softmax. Decodes, first
in the flat batch, run in one launch with small tiles and one program per (sequence, KV head); prefill
chunks run in a second launch with large tiles, mapped to (sequence, first query) by host-built arrays.

The KV write takes a slot per token; slot -1 skips the token, so padded rows of a CUDA graph write
nothing. A sequence with context 0 (padding) writes zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from quanta.model.attention import SeqSlice

# The interpreter computes bf16/fp16 dot products wrongly (numpy has no bf16): upcast there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _write_kv_kernel(
    k,
    v,
    k_cache,
    v_cache,
    slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ch,
    stride_cs,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        dst = (slot // BLOCK_SIZE) * stride_cb + h * stride_ch + (slot % BLOCK_SIZE) * stride_cs + d
        key = tl.load(k + t * stride_kt + h * stride_kh + d, mask=mask)
        tl.store(k_cache + dst, key, mask=mask)
        val = tl.load(v + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(v_cache + dst, val, mask=mask)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _paged_attention_kernel(
    out,
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    query_start,
    tile_seq,
    tile_q,
    scale_log2,  # softmax scale * log2(e): the kernel uses exp2
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ch,
    stride_cs,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
    BLOCK_M: tl.constexpr,  # rows per program: query tokens x GROUP
    BLOCK_N: tl.constexpr,  # keys per iteration
    BLOCK_D: tl.constexpr,
    TILED: tl.constexpr,  # False: program i is sequence i with one tile
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    if TILED:
        seq = tl.load(tile_seq + pid)
        q_first = tl.load(tile_q + pid)
    else:
        seq = pid
        q_first = 0
    q_begin = tl.load(query_start + seq)
    q_len = tl.load(query_start + seq + 1) - q_begin
    ctx = tl.load(seq_lens + seq)
    prefix = ctx - q_len  # position of the sequence's first query token

    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    rows = tl.arange(0, BLOCK_M)
    tok = q_first + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_rows = (q_begin + tok).to(tl.int64)
    qv = tl.load(
        q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = prefix + tok

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_end = tl.minimum(ctx, prefix + q_first + BLOCK_Q)  # causal: keys up to the tile's last query
    table = block_tables + seq.to(tl.int64) * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        kv_off = block * stride_cb + kv_head * stride_ch + (n % BLOCK_SIZE) * stride_cs
        kt = tl.load(k_cache + kv_off[None, :] + d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(qv, kt, IEEE, UPCAST) * scale_log2
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_cache + kv_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE, UPCAST)
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        acc.to(out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@dataclass(slots=True)
class TritonMetadata:
    slots: torch.Tensor  # [T] int32, -1: do not write
    block_tables: torch.Tensor  # [S, W] int32
    seq_lens: torch.Tensor  # [S] int32: context after the step
    query_start: torch.Tensor  # [S + 1] int32: first row of each sequence in the flat batch
    tile_seq: torch.Tensor  # [num_prefill_tiles] int32
    tile_q: torch.Tensor  # [num_prefill_tiles] int32
    num_decodes: int
    num_prefill_tiles: int


def pack_int32(parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Copy several int32 arrays to the device in one transfer; returns a view per array.

    Each view starts at a multiple of 16 elements: Triton specializes kernels on pointer alignment, so
    views at arbitrary offsets would compile a new kernel variant for each alignment pattern.
    """
    sizes = [(p.size + 15) // 16 * 16 for p in parts]
    flat = np.zeros(max(sum(sizes), 16), np.int32)
    at = 0
    for p, n in zip(parts, sizes):
        flat[at : at + p.size] = p.reshape(-1)
        at += n
    dev = torch.from_numpy(flat).to(device, non_blocking=True)
    views, at = [], 0
    for p, n in zip(parts, sizes):
        views.append(dev[at : at + p.size].view(p.shape))
        at += n
    return views


class TritonPagedAttention:
    """Same KV layout as the torch backend: K and V each [num_blocks, num_kv_heads, block_size, head_dim]."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
        assert num_heads % num_kv_heads == 0
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5
        self.block_d = triton.next_power_of_2(head_dim)
        # Decode tiles: the GQA group's rows for one token, at least 16 rows (the dot's minimum).
        self.decode_block_m = max(16, triton.next_power_of_2(self.group))
        self.kernels = None  # interface parity with the torch backend

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    def prefill_block_m(self, dtype: torch.dtype) -> int:
        big = 128 if dtype != torch.float32 and self.head_dim <= 128 else 64
        return max(big, triton.next_power_of_2(self.group))

    def build_metadata(
        self,
        seqs: list[SeqSlice],
        num_decodes: int,
        slots: np.ndarray,
        device: torch.device,
        dtype: torch.dtype,
    ) -> TritonMetadata:
        """Decodes (one token, prior context) are the first `num_decodes` sequences."""
        n = len(seqs)
        # Width rounded up to 16 blocks: the row stride is a kernel argument, and Triton specializes on
        # an integer's divisibility by 16 (one compiled variant instead of two).
        width = (max((len(s.block_ids) for s in seqs), default=1) + 15) // 16 * 16
        tables = np.zeros((n, width), np.int32)
        lens = np.empty(n, np.int32)
        starts = np.zeros(n + 1, np.int32)
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_ids)] = s.block_ids
            lens[i] = s.context_len
            starts[i + 1] = starts[i] + s.num_tokens
        block_q = self.prefill_block_m(dtype) // self.group
        tile_seq: list[int] = []
        tile_q: list[int] = []
        for i in range(num_decodes, n):
            firsts = range(0, seqs[i].num_tokens, block_q)
            tile_seq += [i] * len(firsts)
            tile_q += firsts
        parts = [
            slots.astype(np.int32),
            tables,
            lens,
            starts,
            np.array(tile_seq, np.int32),
            np.array(tile_q, np.int32),
        ]
        s_t, tab_t, len_t, start_t, ts_t, tq_t = pack_int32(parts, device)
        return TritonMetadata(s_t, tab_t, len_t, start_t, ts_t, tq_t, num_decodes, len(tile_seq))

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D], rows may be strided
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: TritonMetadata,
    ) -> torch.Tensor:
        self.write_kv(k, v, k_cache, v_cache, meta.slots)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        ieee = q.dtype == torch.float32
        upcast = INTERPRET and q.dtype != torch.float32
        common = dict(
            GROUP=self.group,
            HEAD_DIM=self.head_dim,
            BLOCK_SIZE=self.block_size,
            BLOCK_D=self.block_d,
            IEEE=ieee,
            UPCAST=upcast,
        )
        args = (
            out,
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start,
            meta.tile_seq,
            meta.tile_q,
            self.scale * 1.4426950408889634,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            meta.block_tables.stride(0),
        )
        if meta.num_decodes:
            _paged_attention_kernel[(meta.num_decodes, self.num_kv_heads)](
                *args,
                BLOCK_M=self.decode_block_m,
                BLOCK_N=64 if not ieee else 32,
                TILED=False,
                num_warps=4,
                num_stages=2,
                **common,
            )
        if meta.num_prefill_tiles:
            block_m = self.prefill_block_m(q.dtype)
            _paged_attention_kernel[(meta.num_prefill_tiles, self.num_kv_heads)](
                *args,
                BLOCK_M=block_m,
                BLOCK_N=64 if not ieee else 32,
                TILED=True,
                num_warps=8 if block_m >= 128 else 4,
                num_stages=2,
                **common,
            )
        return out

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.is_contiguous()
        if k.shape[0] == 0:
            return
        _write_kv_kernel[(k.shape[0],)](
            k,
            v,
            k_cache,
            v_cache,
            slots,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            NUM_KV_HEADS=self.num_kv_heads,
            HEAD_DIM=self.head_dim,
            BLOCK_SIZE=self.block_size,
            BLOCK_H=triton.next_power_of_2(self.num_kv_heads),
            BLOCK_D=self.block_d,
        )
