"""Prepacked CPU linears (AMX and AVX512-BF16 kernels, oneDNN) against a float64 reference."""

from __future__ import annotations

import copy
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quanta.model.cpu_kernels import cpu_kernels
from quanta.model.cpu_linear import AMXLinear, AVX512BF16Linear, PackedLinear, matching_chains, pack_linears

# Both kernels take amx_pack's layout: name -> (whether it runs here, the linear, its layer's maker, why not).
KERNELS = {
    "amx": ("amx_available", "amx_linear", AMXLinear, "this CPU (or its OS) has no AMX bfloat16 tiles"),
    "avx512_bf16": (
        "avx512_bf16_linear_available",
        "avx512_bf16_linear",
        # Any chain length rounds once from float32 sums; where no length follows F.linear, one chain.
        lambda linear, kernels: AVX512BF16Linear(
            linear, kernels, matching_chains(linear, kernels) or (0, 0), keep_onednn=False
        ),
        "this CPU has no AVX512-BF16",
    ),
}


def linear_kernels(kind: str) -> ModuleType:
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("C++ CPU kernels unavailable here")
    available, _, _, why = KERNELS[kind]
    if not getattr(kernels, available)():
        pytest.skip(why)
    return kernels


def check_rounded(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out is x @ w.T (+ b) in float32 accumulation, rounded once to bfloat16."""
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # One bfloat16 rounding (relative 2^-9) plus float32 accumulation over K products.
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-4)


@pytest.mark.parametrize("n,k", [(960, 576), (100, 64), (17, 32), (3072, 96)])
@pytest.mark.parametrize("m", [1, 5, 6, 7, 16, 17, 31, 32, 33, 48, 100, 200])
@pytest.mark.parametrize("kind", KERNELS)
def test_linear_kernel_matches_reference(kind: str, m: int, n: int, k: int) -> None:
    """Row counts on and off the tiles (AMX: 16 rows and a zero-padded tail; AVX512: 6-row blocks, 192-row
    chunks), columns off the 32-column groups and the 64-column pairs of groups."""
    kernels = linear_kernels(kind)
    linear = getattr(kernels, KERNELS[kind][1])
    g = torch.Generator().manual_seed(m * 1000 + n)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    packed = kernels.amx_pack(w)
    check_rounded(linear(x, packed, n), x, w, None)
    check_rounded(linear(x, packed, n, b), x, w, b)


@pytest.mark.parametrize("kind", KERNELS)
def test_linear_layer_shapes_and_strides(kind: str) -> None:
    """The layer keeps leading dims, reads row-strided views in place and copies other layouts."""
    kernels = linear_kernels(kind)
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 40, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 64, generator=g) * 0.1)
    layer = KERNELS[kind][2](linear, kernels)
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


@pytest.mark.parametrize("kind", KERNELS)
def test_linear_kernel_rejects_bad_shapes(kind: str) -> None:
    kernels = linear_kernels(kind)
    linear = getattr(kernels, KERNELS[kind][1])
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.amx_pack(torch.zeros(8, 40, dtype=torch.bfloat16))
    packed = kernels.amx_pack(torch.zeros(8, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="does not match"):
        linear(torch.zeros(2, 64, dtype=torch.bfloat16), packed, 40)
    with pytest.raises(RuntimeError, match="bfloat16"):
        linear(torch.zeros(2, 64), packed, 8)


def test_pack_linears_picks_a_packing_per_layer() -> None:
    """AMX where the kernel applies (bf16, K % 32 == 0), else AVX512-BF16 where the CPU has it, oneDNN's
    packing elsewhere where oneDNN packs
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
    avx512 = kernels is not None and kernels.avx512_bf16_linear_available()
    other = PackedLinear if torch.ops.mkldnn._is_mkldnn_bf16_supported() else nn.Linear
    # K = 40 is not a multiple of 32 (neither kernel for the third); the fourth is float32.
    # AVX512-BF16 where its float32 sums can follow oneDNN's (F.linear's) bit for bit.
    kinds = [AVX512BF16Linear if avx512 and matching_chains(layer, kernels) else other for layer in model[:2]]
    expected_kinds = ([AMXLinear] * 2 if amx else kinds) + [other, nn.Linear]
    assert pack_linears(model, kernels) == sum(k is not nn.Linear for k in expected_kinds[:3])
    assert [type(layer) for layer in model] == expected_kinds
    with torch.inference_mode():
        torch.testing.assert_close(model[:3](x), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (2048, 256)])
def test_avx512_layer_is_f_linear_bit_for_bit_where_its_chains_match(k: int, n: int) -> None:
    """The chains found on one probe make the layer reproduce F.linear on other inputs and row counts
    (one row and several: oneDNN's order of sums differs between them)."""
    kernels = linear_kernels("avx512_bf16")
    g = torch.Generator().manual_seed(k + n)
    linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    chains = matching_chains(linear, kernels)
    if chains is None:
        pytest.skip("this torch's F.linear sums in an order the kernel does not follow")
    kernel_only = AVX512BF16Linear(linear, kernels, chains, keep_onednn=False)
    both = AVX512BF16Linear(linear, kernels, chains, keep_onednn=True)  # oneDNN above DECODE_ROWS
    with torch.inference_mode():
        for m in (1, 2, 5, 33, 96, 97, 200):
            x = torch.randn(m, k, generator=g).bfloat16()
            expected = F.linear(x, linear.weight)
            assert torch.equal(kernel_only(x), expected), m
            assert torch.equal(both(x), expected), m


def test_pack_linears_keeps_lm_head_on_onednn_and_a_second_copy_only_where_memory_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernels = linear_kernels("avx512_bf16")
    if kernels.amx_available():
        pytest.skip("AMX takes precedence here")
    import quanta.model.cpu_linear as cpu_linear

    base = nn.Module()
    base.proj = nn.Linear(576, 960, bias=False).bfloat16()
    base.lm_head = nn.Linear(576, 1000, bias=False).bfloat16()

    roomy = copy.deepcopy(base)
    assert pack_linears(roomy, kernels) == 2
    assert isinstance(roomy.proj, AVX512BF16Linear) and roomy.proj.onednn is not None
    assert isinstance(roomy.lm_head, PackedLinear)
    monkeypatch.setattr(cpu_linear, "physical_memory", lambda: 4 * 2**20)  # both copies would not fit
    tight = copy.deepcopy(base)
    pack_linears(tight, kernels)
    assert isinstance(tight.proj, AVX512BF16Linear) and tight.proj.onednn is None
    x = torch.randn(200, 576).bfloat16()  # above DECODE_ROWS: the kernel itself where no copy is kept
    with torch.inference_mode():
        assert torch.equal(tight.proj(x), roomy.proj(x))


def test_packed_weights_move_to_one_buffer_of_huge_pages_unchanged() -> None:
    """A process's first load left its packed weights on scattered 4 KB pages and decoded 6-13% slower than
    later loads; pack_linears moves them into one 2 MB-aligned buffer madvised for transparent huge pages.
    Only their address changes: the layers compute the very same bits."""
    import mmap

    from quanta.model.cpu_linear import huge_page_buffer, move_to_huge_pages

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no madvise(MADV_HUGEPAGE) on this OS")
    buf = huge_page_buffer(5 << 20)
    if buf is None:
        pytest.skip("this kernel refuses madvise(MADV_HUGEPAGE) (no transparent huge pages): weights stay put")
    assert buf.numel() == 5 << 20 and buf.data_ptr() % (2 << 20) == 0
    # Any module with a contiguous packed_weight moves, each weight 64-byte aligned in the buffer.
    g = torch.Generator().manual_seed(0)
    holders = [nn.Module() for _ in range(3)]
    for i, holder in enumerate(holders):
        holder.packed_weight = torch.randn(7 + i, 33, generator=g).bfloat16()
    before = [h.packed_weight.clone() for h in holders]
    assert move_to_huge_pages(holders) == sum(-(-w.numel() * 2 // 64) * 64 for w in before)
    storages = {h.packed_weight.untyped_storage().data_ptr() for h in holders}
    assert len(storages) == 1 and all(h.packed_weight.data_ptr() % 64 == 0 for h in holders)
    assert all(torch.equal(h.packed_weight, w) for h, w in zip(holders, before))
    # A packed model: every AMX-layout layer in the buffer, outputs bit for bit those of its own copies.
    kernels = cpu_kernels()
    model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 256)).bfloat16()
    pack_linears(model, kernels)
    layers = [m for m in model if isinstance(m, AMXLinear)]
    if not layers:
        pytest.skip("no AMX or AVX512-BF16 kernel on this CPU: nothing packed in the AMX layout")
    assert len({m.packed_weight.untyped_storage().data_ptr() for m in layers}) == 1
    assert min(m.packed_weight.data_ptr() for m in layers) % (2 << 20) == 0
    x = torch.randn(5, 512, generator=g).bfloat16()
    with torch.inference_mode():
        moved = model(x)
        for m in layers:
            m.packed_weight = m.packed_weight.clone()  # back on the allocator's pages
        assert torch.equal(model(x), moved)
