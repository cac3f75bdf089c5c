"""Host-memory KV blocks for preemption by swapping, and merging block copies into contiguous runs.

A swap moves a request's blocks as (src, dst) pairs; consecutive pairs whose source and destination
both advance by one merge into one run, i.e. one copy call per layer tensor instead of one per block
(FastSwitch's block groups).
"""

from __future__ import annotations

import bisect
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
    """Host block ids kept as sorted ranges of free blocks. With `contiguous`, an allocation takes the
    first range that holds it whole (first fit); otherwise, or when no range is long enough, it takes
    the lowest free blocks. Cost grows with the number of free ranges, not of blocks."""

    def __init__(self, num_blocks: int, contiguous: bool = True) -> None:
        assert num_blocks >= 0
        self.num_blocks = num_blocks
        self.contiguous = contiguous
        self._starts: list[int] = [0] if num_blocks else []  # sorted starts of the free ranges
        self._length: dict[int, int] = {0: num_blocks} if num_blocks else {}
        self._num_free = num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def free_block_ids(self) -> set[int]:
        return {b for s in self._starts for b in range(s, s + self._length[s])}

    def allocate(self, n: int) -> list[int]:
        assert 0 < n <= self._num_free, f"cannot allocate {n} host blocks, {self._num_free} free"
        self._num_free -= n
        if self.contiguous:
            for i, start in enumerate(self._starts):
                if self._length[start] >= n:
                    return self._take(i, n)
        out: list[int] = []
        while len(out) < n:
            out += self._take(0, min(n - len(out), self._length[self._starts[0]]))
        return out

    def _take(self, i: int, n: int) -> list[int]:
        """The first n blocks of the i-th free range."""
        start = self._starts[i]
        length = self._length.pop(start)
        if length > n:
            self._starts[i] = start + n
            self._length[start + n] = length - n
        else:
            del self._starts[i]
        return list(range(start, start + n))

    def free(self, block_ids: Sequence[int]) -> None:
        ids = sorted(block_ids)
        assert len(set(ids)) == len(ids), "a host block freed twice in one call"
        run_start = 0
        for k in range(1, len(ids) + 1):
            if k == len(ids) or ids[k] != ids[k - 1] + 1:
                self._insert(ids[run_start], k - run_start)
                run_start = k
        self._num_free += len(ids)

    def _insert(self, start: int, n: int) -> None:
        """Return the range [start, start + n) to the free ranges, merging with its neighbours."""
        assert start >= 0 and start + n <= self.num_blocks, (
            f"host blocks {start}..{start + n - 1} out of range"
        )
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts):
            assert start + n <= self._starts[i], f"double free of host block {self._starts[i]}"
        if i > 0:
            prev = self._starts[i - 1]
            assert prev + self._length[prev] <= start, f"double free of host block {start}"
        if i < len(self._starts) and self._starts[i] == start + n:  # merge with the next range
            n += self._length.pop(self._starts.pop(i))
        if i > 0 and (prev := self._starts[i - 1]) + self._length[prev] == start:  # and the previous
            self._length[prev] += n
        else:
            self._starts.insert(i, start)
            self._length[start] = n
