"""Paged attention backends against a dense reference, on random paged layouts."""

from __future__ import annotations

import pytest
import torch

from quanta.model.attention import AttentionMetadata, PrefillChunk, TorchPagedAttention
from quanta.model.cpu_kernels import cpu_kernels


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int) -> torch.Tensor:
    """q [n, H, D] at positions first_pos.. against keys/values [L, Hkv, D], causal, in float64."""
    h, hkv = q.shape[1], keys.shape[1]
    k = keys.double().repeat_interleave(h // hkv, 1)
    v = values.double().repeat_interleave(h // hkv, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) / q.shape[-1] ** 0.5
    pos = torch.arange(first_pos, first_pos + q.shape[0])
    scores.masked_fill_(torch.arange(keys.shape[0])[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def random_layout(num_blocks: int, context_lens: list[int], block_size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in context_lens:
        nb = -(-n // block_size)
        tables.append(perm[used : used + nb])
        used += nb
    return tables


@pytest.mark.parametrize("kernels", [False, True], ids=["portable", "cpp"])
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 16), (torch.float32, 64), (torch.bfloat16, 64)])
def test_decode_and_prefill_against_dense_reference(kernels: bool, dtype: torch.dtype, head_dim: int) -> None:
    module = cpu_kernels() if kernels else None
    if kernels and module is None:
        pytest.skip("C++ kernels cannot be built here")
    bs, h, hkv, nblocks = 16, 4, 2, 96
    attn = TorchPagedAttention(h, hkv, head_dim, bs, kernels=module)
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(attn.kv_cache_shape(nblocks), generator=g).to(dtype)
    v_cache = torch.randn(attn.kv_cache_shape(nblocks), generator=g).to(dtype)
    # Ragged decodes (block boundaries included) and two prefill chunks: one with cached context, one fresh.
    decode_lens = sorted([1, 15, 16, 17, 33, 64, 100, 160])
    chunk_ctx, chunk_new, fresh_len = 70, 21, 19
    tables = random_layout(nblocks, [*decode_lens, chunk_ctx, fresh_len], bs, seed=1)
    nd = len(decode_lens)
    total = nd + chunk_new + fresh_len
    q = torch.randn(total, h, head_dim, generator=g).to(dtype)
    k = torch.randn(total, hkv, head_dim, generator=g).to(dtype)
    v = torch.randn(total, hkv, head_dim, generator=g).to(dtype)
    positions = (
        [n - 1 for n in decode_lens] + list(range(chunk_ctx - chunk_new, chunk_ctx)) + list(range(fresh_len))
    )
    owners = list(range(nd)) + [nd] * chunk_new + [nd + 1] * fresh_len
    slots = [tables[o][p // bs] * bs + p % bs for o, p in zip(owners, positions)]
    slot_t = torch.tensor(slots)
    meta = AttentionMetadata(
        slot_blocks=slot_t // bs,
        slot_offsets=slot_t % bs,
        prefills=[
            PrefillChunk(nd, chunk_new, chunk_ctx, torch.tensor(tables[nd])),
            PrefillChunk(nd + chunk_new, fresh_len, fresh_len, torch.tensor(tables[nd + 1])),
        ],
    )
    attn.plan_decodes(tables[:nd], decode_lens, torch.device("cpu"), meta)
    out = attn.forward(q, k, v, k_cache, v_cache, meta)

    def context(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(n)
        blocks = torch.tensor(tables[i])[pos // bs]
        return k_cache[blocks, :, pos % bs], v_cache[blocks, :, pos % bs]

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, n in enumerate(decode_lens):
        keys, values = context(i, n)
        torch.testing.assert_close(
            out[i].double(), reference(q[i : i + 1], keys, values, n - 1)[0], atol=tol, rtol=tol
        )
    keys, values = context(nd, chunk_ctx)
    rows = slice(nd, nd + chunk_new)
    torch.testing.assert_close(
        out[rows].double(), reference(q[rows], keys, values, chunk_ctx - chunk_new), atol=tol, rtol=tol
    )
    keys, values = context(nd + 1, fresh_len)
    rows = slice(nd + chunk_new, total)
    torch.testing.assert_close(out[rows].double(), reference(q[rows], keys, values, 0), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_ops_match_torch(dtype: torch.dtype) -> None:
    from quanta.model.llama import RMSNorm, apply_rotary

    module = cpu_kernels()
    if module is None:
        pytest.skip("C++ kernels cannot be built here")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 64, generator=g) * 3).to(dtype)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    norm = norm.to(dtype)
    expected = norm(x)
    norm.kernels = module
    # float32 sums may associate differently; bfloat16 results land on the same or the adjacent value.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(norm(x), expected, **tol)

    q = torch.randn(37, 4, 16, generator=g).to(dtype)
    k = torch.randn(37, 2, 16, generator=g).to(dtype)
    angles = torch.randn(37, 8, generator=g)
    emb = torch.cat([angles, angles], dim=-1)
    rope = (emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1))
    q_ref, k_ref = apply_rotary(q, k, rope, None)
    q_out, k_out = apply_rotary(q.clone(), k.clone(), rope, module)
    exact = (
        dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=0)
    )  # fp32: FMA contraction
    torch.testing.assert_close(q_out, q_ref, **exact)
    torch.testing.assert_close(k_out, k_ref, **exact)

    gate_up = (torch.randn(37, 2 * 48, generator=g) * 4).to(dtype)
    gate, up = gate_up.split(48, dim=-1)
    torch.testing.assert_close(module.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, **tol)
