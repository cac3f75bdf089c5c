"""Paged attention backends against a dense reference, on random paged layouts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from quanta.model.attention import AttentionBackend, SeqSlice, TorchPagedAttention
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


def make_backend(name: str, h: int, hkv: int, head_dim: int, bs: int) -> AttentionBackend:
    if name == "triton":
        pytest.importorskip("triton")
        from quanta.model.triton_attention import TritonPagedAttention

        return TritonPagedAttention(h, hkv, head_dim, bs)
    module = cpu_kernels() if name == "cpp" else None
    if name == "cpp" and module is None:
        pytest.skip("C++ kernels cannot be built here")
    return TorchPagedAttention(h, hkv, head_dim, bs, kernels=module)


BACKENDS = ["portable", "cpp", "triton"]
# (new tokens, context) per sequence; decodes (1 new token, earlier context) first.
LAYOUTS = {
    # Ragged decodes across block boundaries, a chunk with cached context (a prefix hit or an earlier
    # chunk), a fresh prompt, and a prompt of one token.
    "mixed": [(1, n) for n in sorted([2, 15, 16, 17, 33, 64, 100, 160])] + [(21, 70), (19, 19), (1, 1)],
    "decode-only": [(1, n) for n in sorted([3, 16, 31, 32, 49, 130, 257])],
    "prefill-only": [(150, 150), (40, 200), (16, 48)],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 16), (torch.float32, 64), (torch.bfloat16, 64)])
def test_attention_against_dense_reference(
    backend: str, layout: str, dtype: torch.dtype, head_dim: int
) -> None:
    bs, h, hkv, nblocks = 16, 4, 2, 128
    attn = make_backend(backend, h, hkv, head_dim, bs)
    seqs_spec = LAYOUTS[layout]
    nd = sum(1 for new, ctx in seqs_spec if new == 1 and ctx > 1)
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(attn.kv_cache_shape(nblocks), generator=g).to(dtype)
    v_cache = torch.randn(attn.kv_cache_shape(nblocks), generator=g).to(dtype)
    tables = random_layout(nblocks, [ctx for _, ctx in seqs_spec], bs, seed=1)
    total = sum(new for new, _ in seqs_spec)
    # q/k/v as views of one fused projection, as the model passes them (strided rows).
    qkv = torch.randn(total, (h + 2 * hkv) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([h * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    q, k, v = q.view(total, h, head_dim), k.view(total, hkv, head_dim), v.view(total, hkv, head_dim)
    seqs, slots = [], []
    for (new, ctx), table in zip(seqs_spec, tables):
        seqs.append(SeqSlice(new, ctx, table))
        slots += [table[p // bs] * bs + p % bs for p in range(ctx - new, ctx)]
    dev = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    meta = attn.build_metadata(seqs, nd, np.array(slots), dev, dtype)
    k_dev, v_dev = k_cache.to(dev), v_cache.to(dev)
    out = attn.forward(q.to(dev), k.to(dev), v.to(dev), k_dev, v_dev, meta).cpu()
    k_cache, v_cache = k_dev.cpu(), v_dev.cpu()

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    row = 0
    for (new, ctx), table in zip(seqs_spec, tables):
        pos = torch.arange(ctx)
        blocks = torch.tensor(table)[pos // bs]
        keys, values = k_cache[blocks, :, pos % bs], v_cache[blocks, :, pos % bs]
        rows = slice(row, row + new)
        # The new tokens' KV went into the cache.
        torch.testing.assert_close(keys[ctx - new :], k[rows], atol=0, rtol=0)
        torch.testing.assert_close(values[ctx - new :], v[rows], atol=0, rtol=0)
        expected = reference(q[rows], keys, values, ctx - new)
        torch.testing.assert_close(out[rows].double(), expected, atol=tol, rtol=tol)
        row += new


@pytest.mark.parametrize("kind", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_match_torch(kind: str, dtype: torch.dtype) -> None:
    if kind == "triton":
        pytest.importorskip("triton")
        from quanta.model import triton_kernels as module
    else:
        module = cpu_kernels()
    if module is None:
        pytest.skip("C++ kernels cannot be built here")
    dev = "cuda" if kind == "triton" and torch.cuda.is_available() else "cpu"
    _check_fused_ops(
        module, dtype, dev, interpreted=kind == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    )


def _check_fused_ops(module: object, dtype: torch.dtype, dev: str, interpreted: bool) -> None:
    from quanta.model.llama import RMSNorm, apply_rotary

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 64, generator=g) * 3).to(dtype).to(dev)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    norm = norm.to(dtype).to(dev)
    expected = norm(x)
    norm.kernels = module
    # float32 sums may associate differently; bfloat16 results land on the same or the adjacent value.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(norm(x), expected, **tol)
    y = (torch.randn(37, 64, generator=g) * 3).to(dtype).to(dev)
    norm.kernels = None
    expected_sum, expected_norm = norm.add_norm(x, y)
    norm.kernels = module
    got_sum, got_norm = norm.add_norm(x, y)  # fused where the module has add_rms_norm
    # Triton's interpreter rounds float32 -> bfloat16 by truncation: one bf16 step there.
    sum_tol = (
        dict(atol=0, rtol=0) if not interpreted or dtype == torch.float32 else dict(atol=0.07, rtol=8e-3)
    )
    torch.testing.assert_close(got_sum, expected_sum, **sum_tol)
    torch.testing.assert_close(got_norm, expected_norm, **tol)
    if dev == "cpu" and hasattr(module, "add_rms_norm"):  # the C++ kernel: the unfused kernels' result exactly
        assert torch.equal(got_norm, module.rms_norm(got_sum, norm.weight, 1e-6))

    q = torch.randn(37, 4, 16, generator=g).to(dtype).to(dev)
    k = torch.randn(37, 2, 16, generator=g).to(dtype).to(dev)
    angles = torch.randn(37, 8, generator=g)
    emb = torch.cat([angles, angles], dim=-1).to(dev)
    rope = (emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1))
    q_ref, k_ref = apply_rotary(q, k, rope, None)
    q_out, k_out = apply_rotary(q.clone(), k.clone(), rope, module)
    # fp32: FMA contraction. bf16: exact for the C++ kernel; Triton's interpreter rounds float32 -> bf16 by
    # truncation, and on the GPU Triton may keep a product in float32 that torch rounds: one bf16 step.
    if dtype == torch.float32:
        exact = dict(atol=1e-6, rtol=1e-5)
    else:
        exact = dict(atol=0, rtol=0) if dev == "cpu" and not interpreted else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(q_out, q_ref, **exact)
    torch.testing.assert_close(k_out, k_ref, **exact)

    gate_up = (torch.randn(37, 2 * 48, generator=g) * 4).to(dtype).to(dev)
    gate, up = gate_up.split(48, dim=-1)
    torch.testing.assert_close(module.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, **tol)


def test_cpu_argmax_rows_is_torch_argmax() -> None:
    """The greedy pick of the CPU kernels: torch.argmax's first-maximum rule, ties and tails included."""
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("C++ CPU kernels unavailable here")
    g = torch.Generator().manual_seed(0)
    for v in (1, 15, 16, 17, 49152, 151936 + 7):
        x = torch.randn(9, v, generator=g)
        x[1, v // 2] = x[1, -1] = 50.0  # a tie: the first one wins
        x[2, -1] = 60.0  # the maximum in the non-vector tail
        x[3] = 1.0  # all equal
        assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1)), v


def test_cpu_silu_and_mul_is_torch_in_bfloat16() -> None:
    """The vectorized bfloat16 silu_and_mul rounds as torch does for every finite bfloat16 gate value
    (silu rounded to bfloat16, then the product): equal except gates below -87.3, where its silu is -0
    instead of a value under 1e-36."""
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("C++ CPU kernels unavailable here")
    gates = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gates = gates[torch.isfinite(gates.float())].reshape(1, -1)
    g = torch.Generator().manual_seed(7)
    for up in (torch.ones_like(gates), (torch.randn(gates.shape, generator=g) * 4).bfloat16()):
        # Rows of odd width: the masked tail of each row.
        for width in (gates.shape[1], 1531):
            n = gates.shape[1] // width * width
            gate_up = torch.cat([gates[:, :n].reshape(-1, width), up[:, :n].reshape(-1, width)], dim=1)
            out = kernels.silu_and_mul(gate_up.contiguous()).float()
            gate, u = gate_up.split(width, dim=-1)
            expected = (torch.nn.functional.silu(gate) * u).float()
            tiny = (out - expected).abs() < 1e-36 * u.float().abs().clamp(min=1.0)  # silu(g < -87.3)
            assert torch.all((out == expected) | tiny)
    # The scalar path (float32, float16) at the extremes: silu of a huge negative gate is 0, not g / e^80.
    gate = torch.tensor([[-3e38, -1e6, -100.0, -88.0, -87.0, -50.0, -1.0, 0.0, 1.0, 50.0, 1e6, 3e38]])
    gate_up = torch.cat([gate, torch.ones_like(gate)], dim=1)
    torch.testing.assert_close(
        kernels.silu_and_mul(gate_up), torch.nn.functional.silu(gate), atol=1e-30, rtol=1e-6
    )


# (new tokens, context) per chunk: fresh prompts, chunks after earlier context, lengths that are and are
# not multiples of the kernel's query and key tiles (8 and 16), one token after a long context.
PREFILL_CHUNKS = [(1, 1), (7, 7), (8, 8), (33, 33), (16, 130), (9, 40), (1, 77), (150, 150), (24, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "h,hkv,head_dim,bs",
    [(9, 3, 64, 16), (4, 4, 128, 16), (6, 2, 40, 5), (2, 1, 16, 32)],
    ids=["gqa3-d64", "mha-d128", "gqa3-d40-bs5", "mqa-d16-bs32"],
)
def test_cpu_prefill_attention_kernel(dtype: torch.dtype, h: int, hkv: int, head_dim: int, bs: int) -> None:
    """paged_prefill_attention against a float64 reference: every chunk in one call, q a strided view,
    rows outside the chunks left untouched, head sizes on both the fixed-size and the run-time paths."""
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("C++ CPU kernels unavailable here")
    g = torch.Generator().manual_seed(3)
    nblocks = sum(-(-ctx // bs) for _, ctx in PREFILL_CHUNKS) + 3
    k_cache = torch.randn(nblocks, hkv, bs, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(nblocks, hkv, bs, head_dim, generator=g).to(dtype)
    tables = random_layout(nblocks, [ctx for _, ctx in PREFILL_CHUNKS], bs, seed=4)
    lead = 5  # rows before the first chunk (decodes, in the model's batches): not written
    total = lead + sum(n for n, _ in PREFILL_CHUNKS)
    # Scaled so that softmaxes are peaked (a wrong mask or a lost rescale shows), as real scores can be.
    qkv = (torch.randn(total, (h + 2) * head_dim, generator=g) * 3).to(dtype)
    q = qkv[:, : h * head_dim].view(total, h, head_dim)
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    info, row = [], lead
    for n, ctx in PREFILL_CHUNKS:
        info.append((row, n, ctx))
        row += n
    out = torch.full((total, h, head_dim), 7.0, dtype=dtype)
    kernels.paged_prefill_attention(q, k_cache, v_cache, table_t, torch.tensor(info), head_dim**-0.5, out)
    assert torch.all(out[:lead] == 7.0)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bfloat16: the output's rounding
    for (first, n, ctx), table in zip(info, tables, strict=True):
        pos = torch.arange(ctx)
        blocks = torch.tensor(table)[pos // bs]
        keys, values = k_cache[blocks, :, pos % bs], v_cache[blocks, :, pos % bs]
        expected = reference(q[first : first + n], keys, values, ctx - n)
        torch.testing.assert_close(out[first : first + n].double(), expected, atol=tol, rtol=tol)


# Contexts on and off the 16-key tiles and the block boundaries; the first three are the small batch.
DECODE_CONTEXTS = [1, 16, 257, 17, 33, 100, 2, 15, 31, 32, 48, 64, 65, 7, 130, 160, 3, 9, 200, 1, 80]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "h,hkv,head_dim,bs",
    [(9, 3, 64, 16), (4, 4, 128, 16), (8, 1, 64, 32), (16, 2, 128, 16), (6, 2, 40, 5)],
    ids=["gqa3-d64", "mha-d128", "mqa-d64-bs32", "gqa8-d128", "gqa3-d40-bs5"],
)
@pytest.mark.parametrize("num_decodes", [3, 21])
def test_cpu_decode_attention_kernel(
    dtype: torch.dtype, h: int, hkv: int, head_dim: int, bs: int, num_decodes: int
) -> None:
    """paged_decode_attention against a float64 reference, q a strided view: few decodes (work split
    by kv head) and many (a request's heads together).
    bfloat16 with head size 64/128 and bs % 16 == 0 takes the AVX512-BF16 path where the CPU has it."""
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("C++ CPU kernels unavailable here")
    g = torch.Generator().manual_seed(5)
    lens = DECODE_CONTEXTS[:num_decodes]
    nblocks = sum(-(-n // bs) for n in lens) + 3
    k_cache = torch.randn(nblocks, hkv, bs, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(nblocks, hkv, bs, head_dim, generator=g).to(dtype)
    tables = random_layout(nblocks, lens, bs, seed=6)
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    qkv = (torch.randn(num_decodes, (h + 2 * hkv) * head_dim, generator=g) * 3).to(dtype)
    q = qkv[:, : h * head_dim].view(num_decodes, h, head_dim)
    out = kernels.paged_decode_attention(q, k_cache, v_cache, table_t, torch.tensor(lens), head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bfloat16: the output's rounding
    for i, (n, table) in enumerate(zip(lens, tables, strict=True)):
        pos = torch.arange(n)
        blocks = torch.tensor(table)[pos // bs]
        expected = reference(q[i : i + 1], k_cache[blocks, :, pos % bs], v_cache[blocks, :, pos % bs], n - 1)
        torch.testing.assert_close(out[i : i + 1].double(), expected, atol=tol, rtol=tol)
