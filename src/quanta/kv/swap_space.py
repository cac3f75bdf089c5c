"""Host-memory KV blocks for preemption by swapping, and merging block copies into contiguous runs.

A swap moves a request's blocks as (src, dst) pairs; consecutive pairs whose source and destination
both advance by one merge into one run, i.e. one copy call per layer tensor instead of one per block
(FastSwitch's block groups).
"""

from __future__ import annotations

from collections.abc import Sequence

Run = tuple[int, int, int]  # (first source block, first destination block, number of blocks)


def merge_runs(pairs: Sequence[tuple[int, int]], merge: bool = True) -> list[Run]:
    runs: list[Run] = []
    for src, dst in pairs:
        if merge and runs:
            s, d, n = runs[-1]
            if src == s + n and dst == d + n:
                runs[-1] = (s, d, n + 1)
                continue
        runs.append((src, dst, 1))
    return runs


class HostBlockPool:
    """Free list of host block ids; hands out a contiguous range when one is free (first fit)."""

    def __init__(self, num_blocks: int, contiguous: bool = True) -> None:
        assert num_blocks >= 0
        self.num_blocks = num_blocks
        self.contiguous = contiguous
        self._free: set[int] = set(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        assert 0 < n <= len(self._free), f"cannot allocate {n} host blocks, {len(self._free)} free"
        free = sorted(self._free)
        out = free[:n]
        if self.contiguous:
            start = 0
            for i in range(1, len(free) + 1):
                if i == len(free) or free[i] != free[i - 1] + 1:  # a free range ends at i - 1
                    if i - start >= n:
                        out = free[start : start + n]
                        break
                    start = i
        self._free.difference_update(out)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            assert 0 <= b < self.num_blocks and b not in self._free, f"double free of host block {b}"
        self._free.update(block_ids)
