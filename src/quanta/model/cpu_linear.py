"""Prepacked linear layers for CPU in bfloat16/float16.

Packing the weights once at load time makes every matmul skip the repacking `F.linear` does per call.
Three packings, chosen per layer at load:

- `AMXLinear` (Intel AMX, bfloat16): quanta's own kernel (csrc/amx_linear.cpp) streams each weight tile
  once into the tile registers; timed on a 2-core AMX VM, 1.4-3.7x oneDNN at the 1-32 rows of decode
  steps, 0.9-1.5x at 48-64 and 0.6-2.1x at 128-256 (prefill chunks); bitwise equal to `F.linear` up to
  32 rows there.
- `AVX512BF16Linear` (AVX512-BF16 without AMX, bfloat16): the same layout through VDPBF16PS
  (csrc/avx512_linear.cpp), its float32 sums chained as oneDNN chains them, so bitwise equal to
  `F.linear`; 1.2-1.3x oneDNN over a layer at decode sizes, oneDNN's copy above 96 rows.
- `PackedLinear` (oneDNN's blocked layout, what torch.compile's CPU backend does after freezing): 15-40%
  faster than `F.linear` on small batches, identical results.

Each is used only where a probe at load time reproduces `F.linear`; otherwise the plain layer stays.
"""

from __future__ import annotations

import mmap
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from quanta.model.loader import physical_memory


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int = 32) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class AMXLinear(nn.Module):
    def __init__(self, linear: nn.Linear, kernels: ModuleType) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed_weight = kernels.amx_pack(linear.weight.detach())
        # The kernel adds the bias in float32: converted once here, not on every call.
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self._linear = kernels.amx_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.stride(1) == 1:  # the model's case: no reshapes, ~100 calls a step
            return self._rows(x)
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        return self._rows(rows).view(*x.shape[:-1], self.out_features)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """[M, K] rows (last dim contiguous) -> [M, N]."""
        return self._linear(rows, self.packed_weight, self.out_features, self.bias)


class AVX512BF16Linear(AMXLinear):
    """amx_pack's layout (pairs of k for 16 columns: one VDPBF16PS operand) multiplied with AVX512-BF16
    vector instructions, for CPUs without AMX (AMD Zen 4/5). Each thread streams its column groups once,
    prefetched ahead, so decode steps' linears run nearer the memory bandwidth: on a 2-core Zen VM with
    the weights coming from DRAM, 1.2-1.4x oneDNN's packed matmul over a layer at 1-48 rows, even at
    96, but 0.8-0.9x at 128 rows and more (prefill chunks), where a oneDNN-packed copy (`onednn`, kept
    when memory allows) takes over.

    `chains`: the k per float32 partial sum (one row; several rows) that reproduce `F.linear` bit for
    bit. oneDNN sums k in independent chains (of 512 or 1024 here) and adds them; the kernel follows
    whichever `matching_chains` found on this machine, so either path gives F.linear's result."""

    DECODE_ROWS = 96  # up to this many rows the kernel, above them oneDNN (where its copy is kept)

    def __init__(
        self, linear: nn.Linear, kernels: ModuleType, chains: tuple[int, int], keep_onednn: bool
    ) -> None:
        super().__init__(linear, kernels)
        self._linear = kernels.avx512_bf16_linear
        self.chain_one, self.chain_many = chains
        self.onednn = PackedLinear(linear) if keep_onednn else None

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        m = rows.shape[0]
        if m > self.DECODE_ROWS and self.onednn is not None:
            return self.onednn(rows)
        chain = self.chain_one if m == 1 else self.chain_many
        return self._linear(rows, self.packed_weight, self.out_features, self.bias, chain)


# k per partial sum to try, in this order (0: one chain over all of k).
CHAIN_CANDIDATES = (512, 1024, 0, 256, 2048)


def matching_chains(linear: nn.Linear, kernels: ModuleType) -> tuple[int, int] | None:
    """The chain lengths with which the AVX512-BF16 kernel gives exactly `F.linear`'s output for one row
    and for 48 rows (the sum's order can change with the row count), or None if no candidate does."""
    k = linear.in_features
    weight, bias = linear.weight.detach(), linear.bias
    packed = kernels.amx_pack(weight)
    bias_f = None if bias is None else bias.detach().float()
    x = torch.randn(48, k, generator=torch.Generator().manual_seed(0)).to(weight.dtype)

    def run(rows: torch.Tensor, chain: int) -> torch.Tensor:
        return kernels.avx512_bf16_linear(rows, packed, linear.out_features, bias_f, chain)

    singles = [x[i : i + 1] for i in range(16)]
    with torch.inference_mode():
        ref_one = torch.cat([F.linear(row, weight, bias) for row in singles])
        ref_many = F.linear(x, weight, bias)
        tried = [c for c in CHAIN_CANDIDATES if c <= k]
        one = next(
            (c for c in tried if torch.equal(torch.cat([run(row, c) for row in singles]), ref_one)), None
        )
        many = next((c for c in tried if torch.equal(run(x, c), ref_many)), None)
    return None if one is None or many is None else (one, many)


def avx512_bf16_usable(linear: nn.Linear, kernels: ModuleType | None) -> bool:
    return (
        kernels is not None
        and getattr(kernels, "avx512_bf16_linear_available", lambda: False)()
        and linear.weight.dtype == torch.bfloat16
        and linear.in_features % 32 == 0
    )


def amx_usable(linear: nn.Linear, kernels: ModuleType | None) -> bool:
    return (
        kernels is not None
        and kernels.amx_available()
        and linear.weight.dtype == torch.bfloat16
        and linear.in_features % 32 == 0
    )


def _packed(
    linear: nn.Linear,
    kernels: ModuleType | None,
    chains_by_shape: dict[tuple[int, int, bool], tuple[int, int] | None],
    vector_kernel: bool,
    keep_onednn: bool,
) -> nn.Module | None:
    probe = torch.randn(3, linear.in_features, dtype=linear.weight.dtype)
    with torch.inference_mode():
        expected = F.linear(probe, linear.weight, linear.bias)
    candidates = [lambda: AMXLinear(linear, kernels)] if amx_usable(linear, kernels) else []
    if vector_kernel and avx512_bf16_usable(linear, kernels):
        assert kernels is not None
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        if shape not in chains_by_shape:  # the same for every layer of a shape: probed once
            chains_by_shape[shape] = matching_chains(linear, kernels)
        chains = chains_by_shape[shape]
        if chains is not None:
            candidates.append(lambda: AVX512BF16Linear(linear, kernels, chains, keep_onednn))
    candidates.append(lambda: PackedLinear(linear))
    for make in candidates:
        try:
            packed = make()
            with torch.inference_mode():
                if torch.allclose(packed(probe), expected, atol=1e-2, rtol=1e-2):
                    return packed
        except (RuntimeError, AttributeError):
            continue
    return None


def pack_linears(model: nn.Module, kernels: ModuleType | None = None) -> int:
    """Replace the model's bf16/fp16 nn.Linear layers by prepacked ones where possible (AMX where
    `kernels`, the C++ CPU kernels, have it, else AVX512-BF16 where its sums match F.linear's, else
    oneDNN's packing); returns how many.

    The vocabulary projection (`lm_head`) keeps oneDNN's packing on AVX512: as wide as it is, oneDNN
    streams it as fast (0.7-1.2x the kernel at 1-48 rows). The AVX512-BF16 layers also keep oneDNN's
    copy for prefill-sized batches when both copies of the model's linears take at most a quarter of the
    physical memory (the SmolLM2-135M default: 0.4 GB)."""
    linears = [
        (parent, name, child)
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if isinstance(child, nn.Linear)
        and child.weight.device.type == "cpu"
        and child.weight.dtype in (torch.bfloat16, torch.float16)
    ]
    weight_bytes = sum(child.weight.numel() * child.weight.element_size() for _, _, child in linears)
    keep_onednn = 2 * weight_bytes <= physical_memory() // 4
    count = 0
    chains_by_shape: dict[tuple[int, int, bool], tuple[int, int] | None] = {}
    for parent, name, child in linears:
        packed = _packed(child, kernels, chains_by_shape, name != "lm_head", keep_onednn)
        if packed is not None:
            setattr(parent, name, packed)
            count += 1
    move_to_huge_pages([m for m in model.modules() if isinstance(m, AMXLinear)])
    return count


_HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """`nbytes` (uint8) of fresh anonymous memory, 2 MB aligned and madvised for transparent huge pages
    before its first touch; None where that is unavailable (not Linux, or the call fails)."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes <= 0:
        return None
    size = nbytes + _HUGE_PAGE
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(buf, dtype=torch.uint8)  # keeps `buf` alive
        offset = -whole.data_ptr() % _HUGE_PAGE
        buf.madvise(mmap.MADV_HUGEPAGE, offset, size - offset)
    except (OSError, ValueError):
        return None
    return whole[offset : offset + nbytes]


def move_to_huge_pages(modules: list[nn.Module]) -> int:
    """Copy the modules' packed weights into one buffer of transparent huge pages; returns the bytes moved.

    Left where the allocator put them, the weights sit on 4 KB pages, physically as scattered as the
    kernel's free pages were, which for a process's first load is badly (tens to hundreds of contiguous
    runs per 2 MB). Decode steps stream the weights, and on the 2-core AMX VM a scattered copy read at
    10.5 GB/s against 13.6 for contiguous memory: the first load decoded 6-13% slower than later ones.
    Huge pages are contiguous by construction: every load then decodes within 2% of the others, at the
    fast loads' speed. Only the bytes' address changes, so results are bit for bit the same."""
    sizes = [m.packed_weight.numel() * m.packed_weight.element_size() for m in modules]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // 64) * 64  # each weight 64-byte aligned, as the allocator aligns it
    buf = huge_page_buffer(total)
    if buf is None:
        return 0
    for module, offset, size in zip(modules, offsets, sizes):
        old = module.packed_weight
        assert old.is_contiguous(), "the kernels read packed weights as one contiguous block"
        # The old copy goes as its module lets go of it: memory peaks one layer above the weights.
        module.packed_weight = buf[offset : offset + size].view(old.dtype).view(old.shape).copy_(old)
    return total
