"""KV swapping between the device cache and host memory, for preemption by swap (FastSwitch).

The plan gives copies as runs of contiguous blocks, so each run is one copy per layer tensor. On
CUDA, swap-outs run on the compute stream (the blocks they free may be written by this very step) and
swap-ins on a side stream that overlaps the following steps; a swap-in is reported done once its event
has completed, and the scheduler leaves that request out until then instead of stalling the batch. On
CPU every copy is synchronous and done when `run` returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quanta.config import CacheConfig
from quanta.sched.plan import StepPlan

Caches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def bytes_per_block(device_caches: Caches) -> int:
    """Bytes of one block's K and V over every layer."""
    return sum(k[0].numel() * k.element_size() + v[0].numel() * v.element_size() for k, v in device_caches)


def num_host_blocks(cache_config: CacheConfig, device_caches: Caches) -> int:
    if cache_config.num_cpu_blocks is not None:
        return cache_config.num_cpu_blocks
    return int(cache_config.swap_space_gb * 2**30 // bytes_per_block(device_caches))


class KVSwapper:
    def __init__(self, device_caches: Caches, num_host_blocks: int) -> None:
        self.device_caches = device_caches
        self.num_host_blocks = num_host_blocks
        self.num_copy_calls = 0
        self.host_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        if num_host_blocks == 0:
            return
        first = device_caches[0][0]
        self.cuda = first.device.type == "cuda"
        shape = (num_host_blocks, *first.shape[1:])
        pin = self.cuda  # pinned host memory lets copies run asynchronously
        self.host_caches = [
            (
                torch.empty(shape, dtype=k.dtype, pin_memory=pin),
                torch.empty(shape, dtype=v.dtype, pin_memory=pin),
            )
            for k, v in device_caches
        ]
        self.stream = torch.cuda.Stream(first.device) if self.cuda else None
        self._pending: list[tuple[list[str], torch.cuda.Event]] = []

    def _copy(self, runs: Sequence[tuple[int, int, int]], to_host: bool) -> None:
        for (dk, dv), (hk, hv) in zip(self.device_caches, self.host_caches):
            for src, dst, n in runs:
                if to_host:
                    hk[dst : dst + n].copy_(dk[src : src + n], non_blocking=self.cuda)
                    hv[dst : dst + n].copy_(dv[src : src + n], non_blocking=self.cuda)
                else:
                    dk[dst : dst + n].copy_(hk[src : src + n], non_blocking=self.cuda)
                    dv[dst : dst + n].copy_(hv[src : src + n], non_blocking=self.cuda)
                self.num_copy_calls += 2

    def run(self, plan: StepPlan) -> list[str]:
        """Carry out the plan's swaps before its forward; returns the requests whose swap-in is done."""
        if not self.host_caches:
            assert not plan.has_swaps, "the plan swaps but the executor has no host KV blocks"
            return []
        if not self.cuda:
            self._copy(plan.swap_out, to_host=True)
            self._copy(plan.swap_in, to_host=False)
            return list(plan.swap_in_ids)
        compute = torch.cuda.current_stream()
        if plan.swap_out:
            # Host blocks just freed by a swap-in may be written now: let pending swap-ins finish first.
            compute.wait_stream(self.stream)
            self._copy(plan.swap_out, to_host=True)
        if plan.swap_in:
            assert self.stream is not None
            # After this step's swap-outs and the previous steps' reads of the reused device blocks.
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                self._copy(plan.swap_in, to_host=False)
                event = torch.cuda.Event()
                event.record(self.stream)
            self._pending.append((list(plan.swap_in_ids), event))
        for request_id in plan.finished_ids:
            # A request aborted mid swap-in: its device blocks go back to the pool, so the compute stream
            # must not write them before the copy has landed.
            for ids, event in self._pending:
                if request_id in ids:
                    compute.wait_event(event)
        if self._pending and plan.is_empty:
            self._pending[0][1].synchronize()  # nothing else to do: wait for the oldest swap-in
        done: list[str] = []
        while self._pending and self._pending[0][1].query():
            done.extend(self._pending.pop(0)[0])
        return done
