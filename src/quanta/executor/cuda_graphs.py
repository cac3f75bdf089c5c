"""Decode-only steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model (or of any model at small batch) is a few hundred short kernels; launched
one by one from Python, the gaps between them cost more than the kernels. Each bucket's forward is
captured once over static input buffers; a step writes its inputs into those buffers (one host-to-device
copy) and replays the graph of the smallest bucket that fits. Padded rows write no KV (slot -1) and
attend to nothing (context 0).

With `capture=False` the same padded static-buffer path runs eagerly: that is how it is tested on CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from quanta.model.llama import LlamaModel
from quanta.model.triton_attention import TritonMetadata


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_batch: int,
        max_blocks: int,
        block_size: int,
        device: torch.device,
        capture: bool,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        self.max_batch = b = self.buckets[-1]
        self.width = w = (max_blocks + 15) // 16 * 16
        # One int32 buffer: ids, positions, slots, context lens, query starts, block tables (last, so a
        # step copies only the rows it uses). Parts start at multiples of 16 elements (aligned pointers).
        sizes = [(n + 15) // 16 * 16 for n in (b, b, b, b, b + 1)] + [b * w]
        offsets = np.cumsum([0, *sizes])
        self._tables_at = int(offsets[5])
        self.host = torch.zeros(int(offsets[-1]), dtype=torch.int32, pin_memory=capture)
        self.dev = torch.zeros(int(offsets[-1]), dtype=torch.int32, device=device)
        host_np = self.host.numpy()
        lengths = [b, b, b, b, b + 1, b * w]
        h = [host_np[offsets[i] : offsets[i] + lengths[i]] for i in range(6)]
        d = [self.dev[int(offsets[i]) : int(offsets[i]) + lengths[i]] for i in range(6)]
        self._ids, self._pos, self._slots, self._lens, starts, tables = h
        self._tables = tables.reshape(b, w)
        starts[:] = np.arange(b + 1)  # one query token per sequence, padded ones included
        self._slots[:] = -1
        self._d_ids, self._d_pos, self._d_slots, self._d_lens, self._d_starts, d_tables = d
        self._d_tables = d_tables.view(b, w)
        self._empty = torch.zeros(0, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def _meta(self, b: int) -> TritonMetadata:
        return TritonMetadata(
            self._d_slots[:b],
            self._d_tables[:b],
            self._d_lens[:b],
            self._d_starts[: b + 1],
            self._empty,
            self._empty,
            num_decodes=b,
            num_prefill_tiles=0,
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self._d_ids[:b], self._d_pos[:b], self.kv_caches, self._meta(b))

    def _capture(self) -> None:
        self.dev.copy_(self.host)  # padding everywhere: capture runs write and read nothing
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the kernels outside the capture
            for b in self.buckets:
                self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its pool memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states [n, hidden] of n decodes; position p's KV goes to block_tables[i][p // bs]."""
        n = len(token_ids)
        b = self.bucket(n)
        bs = self.block_size
        pos = np.asarray(positions, dtype=np.int64)
        self._ids[:n] = token_ids
        self._ids[n:b] = 0
        self._pos[:n] = pos
        self._pos[n:b] = 0
        self._lens[:n] = pos + 1
        self._lens[n:b] = 0
        for i, table in enumerate(block_tables):
            self._tables[i, : len(table)] = table
        last_blocks = self._tables[np.arange(n), pos // bs]
        self._slots[:n] = last_blocks * bs + pos % bs
        self._slots[n:b] = -1
        used = self._tables_at + b * self.width
        self.dev[:used].copy_(self.host[:used], non_blocking=True)
        graph = self.graphs.get(b)
        if graph is None:
            return self._forward(b)[:n]
        graph.replay()
        return self.hidden[b][:n]
