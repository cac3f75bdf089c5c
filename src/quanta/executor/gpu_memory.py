"""GPU memory planning: weights and peak activations are measured at start-up; KV blocks get the rest.

Like vLLM's `--gpu-memory-utilization`: the engine may use that fraction of the card's memory in all,
counting what other processes (and the CUDA context) already hold.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from quanta.kv.manager import cdiv
from quanta.model.attention import SeqSlice
from quanta.model.config import ModelLoadError

if TYPE_CHECKING:
    from quanta.executor.model_executor import ModelExecutor

logger = logging.getLogger("quanta")

GRAPH_RESERVE_BYTES = 512 << 20  # decode graphs' private pool (their activations are small)


@torch.inference_mode()
def profile_peak_activations(ex: ModelExecutor, num_tokens: int, num_seqs: int) -> int:
    """Bytes the largest step allocates beyond the weights: a forward over `num_tokens` prompt tokens
    (split into sequences of at most the model's positions), then logits and sorting for `num_seqs` rows."""
    dev, bs = ex.device, ex.block_size
    max_len = ex.model.rotary.cos.shape[0]
    lengths = [min(max_len, num_tokens - i) for i in range(0, num_tokens, max_len)]
    blocks = sum(cdiv(n, bs) for n in lengths)
    shape = ex.model.attn.kv_cache_shape(blocks)
    # One scratch cache shared by every layer: the KV cache itself is planned separately.
    scratch = (torch.empty(shape, dtype=ex.dtype, device=dev), torch.empty(shape, dtype=ex.dtype, device=dev))
    seqs, slots, positions, first = [], [], [], 0
    for n in lengths:
        ids = list(range(first, first + cdiv(n, bs)))
        first += len(ids)
        seqs.append(SeqSlice(n, n, ids))
        slots.append(np.arange(ids[0] * bs, ids[0] * bs + n))
        positions.append(np.arange(n))
    meta = ex.model.attn.build_metadata(seqs, 0, np.concatenate(slots), dev, ex.dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    input_ids = torch.randint(0, ex.model_config.vocab_size, (num_tokens,), device=dev, generator=gen)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    pos = torch.from_numpy(np.concatenate(positions)).to(dev)
    hidden = ex.model(input_ids, pos, [scratch] * ex.model_config.num_layers, meta)
    rows = hidden[torch.arange(num_seqs, device=dev) % hidden.shape[0]]
    logits = ex.model.logits(rows)
    probs = torch.softmax(logits, dim=-1)
    sorted_logits, order = logits.sort(dim=-1)  # what top-p/top-k sampling allocates
    del probs, sorted_logits, order, logits, rows, hidden
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def plan_gpu_kv_blocks(
    ex: ModelExecutor, utilization: float, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    dev = ex.device
    activations = profile_peak_activations(ex, max_num_batched_tokens, max_num_seqs)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    ours = torch.cuda.memory_reserved(dev)
    others = total - free - ours  # CUDA context, other processes
    weights = torch.cuda.memory_allocated(dev)
    budget = utilization * total - others - weights - activations - GRAPH_RESERVE_BYTES
    per_block = ex.block_size * ex.model_config.kv_bytes_per_token(ex.dtype.itemsize)
    num_blocks = int(budget // per_block)
    gib = 1 << 30
    logger.info(
        "GPU memory: %.1f GiB total, weights %.2f GiB, peak activations %.2f GiB, others %.2f GiB -> "
        "%d KV blocks (%.2f GiB)",
        total / gib,
        weights / gib,
        activations / gib,
        others / gib,
        num_blocks,
        num_blocks * per_block / gib,
    )
    if num_blocks < 1:
        raise ModelLoadError(
            f"no GPU memory left for the KV cache at gpu_memory_utilization={utilization}: weights take "
            f"{weights / gib:.2f} GiB and a {max_num_batched_tokens}-token step {activations / gib:.2f} GiB "
            f"of {total / gib:.1f} GiB; raise the utilization or lower max_num_batched_tokens"
        )
    return num_blocks
