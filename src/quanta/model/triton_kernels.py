"""Fused RMSNorm, rotary embedding and SiLU-and-mul in Triton, for the CUDA path.

Each replaces several torch kernels (a decode step at batch 1 is otherwise mostly launch gaps and tiny
elementwise kernels). They round at the same points as the torch code (and `transformers`): products in
the model dtype are computed in float32 and rounded once.

Same interface as `quanta.model.cpu_kernels`, so `LlamaModel.use_kernels` takes either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROTARY_TAKES_STRIDES = True  # q and k may be views into the fused qkv output; rotated in place


@triton.jit
def _rms_norm_kernel(
    x,
    y,
    w,
    out_sum,
    out_norm,
    stride_x,
    stride_y,
    stride_s,
    stride_o,
    N: tl.constexpr,
    eps,
    BLOCK: tl.constexpr,
    ADD: tl.constexpr,  # True: normalize x + y and also store x + y (the residual stream)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    v = tl.load(x + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        b = tl.load(y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        total = (v + b).to(out_sum.dtype.element_ty)  # rounded as torch's add rounds it
        tl.store(out_sum + row * stride_s + cols, total, mask=mask)
        v = total.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, 0) / N + eps)
    normed = (v * rstd).to(out_norm.dtype.element_ty).to(tl.float32)
    weight = tl.load(w + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_norm + row * stride_o + cols, (normed * weight).to(out_norm.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q,
    k,
    cos,
    sin,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    d_ok = d < HALF
    c = tl.load(cos + t * stride_ct + d, mask=d_ok, other=0.0).to(tl.float32)
    s = tl.load(sin + t * stride_ct + d, mask=d_ok, other=0.0).to(tl.float32)
    for which in tl.static_range(2):
        if which == 0:
            base = q + t * stride_qt + h * stride_qh
            mask = (h < NUM_Q_HEADS) & d_ok
        else:
            base = k + t * stride_kt + h * stride_kh
            mask = (h < NUM_K_HEADS) & d_ok
        dtype = base.dtype.element_ty
        x1 = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + d, mask=mask, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded to the model dtype as torch does.
        y1 = (x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)
        y2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
        tl.store(base + d, y1.to(dtype), mask=mask)
        tl.store(base + HALF + d, y2.to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(x, out, stride_x, stride_o, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + row * stride_o + cols, (act * up).to(out.dtype.element_ty), mask=mask)


def _norm(
    x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, ...]:
    x2 = x.reshape(-1, x.shape[-1])
    y2 = x2 if y is None else y.reshape(x2.shape)
    assert x2.stride(-1) == 1 and y2.stride(-1) == 1
    normed = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    total = normed if y is None else torch.empty_like(normed)
    if x2.shape[0]:
        n = x2.shape[1]
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            y2,
            weight,
            total,
            normed,
            x2.stride(0),
            y2.stride(0),
            total.stride(0),
            normed.stride(0),
            n,
            eps,
            BLOCK=block,
            ADD=y is not None,
            num_warps=min(16, max(1, block // 256)),
        )
    return total.view(x.shape), normed.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, rms_norm(x + y) * weight) in one pass."""
    total, normed = _norm(x, y, weight, eps)
    return total, normed


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """q [T, H, D] and k [T, Hkv, D] (rows may be strided) rotated in place; cos/sin [T, D]."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    t, hq, d = q.shape
    if t == 0:
        return
    half = d // 2
    _rotary_kernel[(t,)](
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        NUM_Q_HEADS=hq,
        NUM_K_HEADS=k.shape[1],
        HALF=half,
        BLOCK_H=triton.next_power_of_2(max(hq, k.shape[1])),
        BLOCK_HALF=triton.next_power_of_2(half),
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2N] = [gate | up] -> silu(gate) * up, [T, N]."""
    assert x.stride(-1) == 1
    t, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block)
    return out
