"""Prepacked CPU linears (AMX kernel, oneDNN) against a float64 reference."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from torch import nn

from quanta.model.cpu_kernels import cpu_kernels
from quanta.model.cpu_linear import AMXLinear, PackedLinear, pack_linears


def amx_kernels() -> ModuleType:
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("C++ CPU kernels unavailable here")
    if not kernels.amx_available():
        pytest.skip("this CPU (or its OS) has no AMX bfloat16 tiles")
    return kernels


def check_rounded(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out is x @ w.T (+ b) in float32 accumulation, rounded once to bfloat16."""
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # One bfloat16 rounding (relative 2^-9) plus float32 accumulation over K products.
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-4)


@pytest.mark.parametrize("n,k", [(960, 576), (100, 64), (17, 32), (3072, 96)])
@pytest.mark.parametrize("m", [1, 5, 16, 17, 31, 32, 33, 48, 100])
def test_amx_linear_matches_reference(m: int, n: int, k: int) -> None:
    """Row counts on and off the 16-row tiles (a zero-padded tail), columns off the 32-column groups."""
    kernels = amx_kernels()
    g = torch.Generator().manual_seed(m * 1000 + n)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    packed = kernels.amx_pack(w)
    check_rounded(kernels.amx_linear(x, packed, n), x, w, None)
    check_rounded(kernels.amx_linear(x, packed, n, b), x, w, b)


def test_amx_linear_layer_shapes_and_strides() -> None:
    """AMXLinear keeps leading dims, reads row-strided views in place and copies other layouts."""
    kernels = amx_kernels()
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 40, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 64, generator=g) * 0.1)
    layer = AMXLinear(linear, kernels)
    wide = torch.randn(7, 3 * 64, generator=g).bfloat16()
    view = wide[:, 64:128]  # rows strided by 192: the q/k/v split of a fused projection
    with torch.inference_mode():
        check_rounded(layer(view), view, linear.weight, linear.bias)
        batch = torch.randn(2, 3, 64, generator=g).bfloat16()
        out = layer(batch)
        assert out.shape == (2, 3, 40)
        check_rounded(out.reshape(6, 40), batch.reshape(6, 64), linear.weight, linear.bias)
        transposed = torch.randn(64, 5, generator=g).bfloat16().T  # columns strided: copied first
        check_rounded(layer(transposed), transposed, linear.weight, linear.bias)
        assert layer(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 40)


def test_amx_linear_rejects_bad_shapes() -> None:
    kernels = amx_kernels()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.amx_pack(torch.zeros(8, 40, dtype=torch.bfloat16))
    packed = kernels.amx_pack(torch.zeros(8, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.amx_linear(torch.zeros(2, 64, dtype=torch.bfloat16), packed, 40)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.amx_linear(torch.zeros(2, 64), packed, 8)


def test_pack_linears_picks_a_packing_per_layer() -> None:
    """AMX where the kernel applies (bf16, K % 32 == 0), oneDNN's packing elsewhere where oneDNN packs
    bf16 on this CPU (AVX512 or AVX-NE-CONVERT), the plain layer otherwise, float32 untouched; the packed
    model computes what the plain one does."""
    kernels = cpu_kernels()
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 40), nn.Linear(40, 8)).bfloat16()
    model.append(nn.Linear(8, 8))  # float32: left as it is
    x = torch.randn(5, 64, generator=g).bfloat16()
    with torch.inference_mode():
        expected = model[:3](x)
    amx = kernels is not None and kernels.amx_available()
    other = PackedLinear if torch.ops.mkldnn._is_mkldnn_bf16_supported() else nn.Linear
    # K = 40 is not a multiple of 32 (no AMX for the third); the fourth is float32.
    expected_kinds = [AMXLinear if amx else other] * 2 + [other, nn.Linear]
    assert pack_linears(model, kernels) == sum(k is not nn.Linear for k in expected_kinds[:3])
    assert [type(layer) for layer in model] == expected_kinds
    with torch.inference_mode():
        torch.testing.assert_close(model[:3](x), expected, rtol=2e-2, atol=2e-2)
