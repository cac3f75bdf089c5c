"""ModelExecutor: runs a step plan through the torch model, one forward for the whole mixed batch."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from quanta.cluster.transport import KVPayload
from quanta.config import CacheConfig
from quanta.executor.base import StepResult, TokenLogprobs
from quanta.executor.gpu_memory import plan_gpu_kv_blocks
from quanta.executor.kv_swap import KVSwapper, num_host_blocks
from quanta.kv.manager import cdiv
from quanta.model.attention import SeqSlice
from quanta.model.config import ModelConfig
from quanta.model.cpu_kernels import cpu_kernels as load_cpu_kernels
from quanta.model.cpu_linear import pack_linears
from quanta.model.loader import load_model, resolve_dtype
from quanta.model.sampler import Sampler, logprob_entries
from quanta.sched.plan import ScheduledRequest, StepPlan

if TYPE_CHECKING:
    from quanta.executor.cuda_graphs import DecodeGraphs


class ModelExecutor:
    def __init__(
        self,
        model_path: str | Path,
        cache_config: CacheConfig,
        max_model_len: int,
        max_num_seqs: int,
        dtype: str = "auto",
        device: str = "cpu",
        seed: int | None = 0,
        model_config: ModelConfig | None = None,
        cpu_kernels: bool = True,
        attention_backend: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int = 2048,
        cuda_graphs: bool | None = None,
        load_format: str = "auto",
    ) -> None:
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"unknown load format {load_format!r}; choose auto or dummy")
        # Checked before the weights load and before the KV pool is sized with them.
        if max_model_len < 2 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_model_len must be at least 2 ({max_model_len}), max_num_seqs and max_num_batched_tokens "
                f"at least 1 ({max_num_seqs}, {max_num_batched_tokens})"
            )
        self.model_config = cfg = model_config or ModelConfig.from_folder(model_path)
        self.device = check_device(device)
        if attention_backend == "triton" and self.device.type != "cuda" and not triton_interpreted():
            raise ValueError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1, for tests)")
        self.dtype = resolve_dtype(dtype, cfg, self.device)
        self.block_size = bs = cache_config.block_size
        self.model = load_model(
            model_path, cfg, self.dtype, self.device, bs, max_positions=max_model_len, dummy=load_format == "dummy"
        )
        if attention_backend == "auto":
            attention_backend = "triton" if self.device.type == "cuda" and triton_installed() else "torch"
        if attention_backend == "triton":
            if not triton_installed():
                raise ValueError("the triton attention backend needs the triton package (pip install triton)")
            from quanta.model import triton_kernels
            from quanta.model.triton_attention import TritonPagedAttention

            self.model.set_attention(TritonPagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, bs))
            self.model.use_kernels(triton_kernels)
        elif attention_backend != "torch":
            raise ValueError(f"unknown attention backend {attention_backend!r}; choose auto, torch or triton")
        self.sampler = Sampler(self.device, seed)
        if self.device.type == "cpu":
            kernels = load_cpu_kernels() if cpu_kernels else None
            pack_linears(self.model, kernels)
            if attention_backend == "torch" and kernels is not None:
                self.model.use_kernels(kernels)
                if hasattr(kernels, "argmax_rows"):
                    self.sampler.argmax = kernels.argmax_rows
        if cache_config.num_blocks is not None:
            num_blocks = cache_config.num_blocks
        elif self.device.type == "cuda":
            num_blocks = plan_gpu_kv_blocks(self, gpu_memory_utilization, max_num_batched_tokens, max_num_seqs)
        else:
            per_block = bs * cfg.kv_bytes_per_token(self.dtype.itemsize)
            by_memory = int(cache_config.kv_cache_memory_gb * 1e9 // per_block)
            # More than every sequence at full length never helps; a tiny model would otherwise get millions.
            num_blocks = max(1, min(by_memory, max_num_seqs * cdiv(max_model_len, bs)))
        shape = self.model.attn.kv_cache_shape(num_blocks)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(cfg.num_layers)
        ]
        self._num_blocks = num_blocks
        self.swapper = KVSwapper(self.kv_caches, num_host_blocks(cache_config, self.kv_caches))
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and attention_backend == "triton"
        self.decode_graphs: DecodeGraphs | None = None
        if cuda_graphs:
            if attention_backend != "triton":
                raise ValueError("decode graphs need the triton attention backend")
            from quanta.executor.cuda_graphs import DecodeGraphs

            with torch.inference_mode():
                self.decode_graphs = DecodeGraphs(
                    self.model,
                    self.kv_caches,
                    max_batch=min(max_num_seqs, 256),
                    max_blocks=cdiv(max_model_len, bs),
                    block_size=bs,
                    device=self.device,
                    capture=self.device.type == "cuda",
                )

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_host_kv_blocks(self) -> int:
        return self.swapper.num_host_blocks

    # ---- live migration (between steps) -------------------------------------------------------------
    @torch.inference_mode()
    def read_kv_blocks(self, block_ids: list[int]) -> KVPayload:
        """Every layer's K and V of these blocks, as one CPU tensor [layers, 2, blocks, ...] (it pickles)."""
        if not block_ids:
            return KVPayload(0, 0, None)
        idx = torch.tensor(block_ids, device=self.device)
        data = torch.stack([torch.stack((k[idx], v[idx])) for k, v in self.kv_caches]).cpu()
        return KVPayload(len(block_ids), data.numel() * data.element_size(), data)

    @torch.inference_mode()
    def write_kv_blocks(self, block_ids: list[int], payload: KVPayload) -> None:
        assert payload.num_blocks == len(block_ids), "payload and block table differ in length"
        if not block_ids:
            return
        data = payload.data.to(self.device, self.dtype)
        layers, block_shape = len(self.kv_caches), tuple(self.kv_caches[0][0].shape[1:])
        if data.shape[0] != layers or tuple(data.shape[3:]) != block_shape:
            raise ValueError(f"KV payload of shape {tuple(data.shape)} does not fit this model's cache")
        idx = torch.tensor(block_ids, device=self.device)
        for layer, (k, v) in enumerate(self.kv_caches):
            k[idx] = data[layer, 0]
            v[idx] = data[layer, 1]

    def get_generator_state(self, request_id: str) -> bytes | None:
        return self.sampler.get_state(request_id)

    def set_generator_state(self, request_id: str, state: bytes | None) -> None:
        self.sampler.set_state(request_id, state)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        for request_id in plan.finished_ids:
            self.sampler.forget(request_id)
        swapped_in = self.swapper.run(plan)
        if plan.is_empty:
            return StepResult({}, time.perf_counter() - start, swapped_in_ids=swapped_in)
        # Decodes first, shortest context first: the attention backend groups them by length.
        decodes = [s for s in plan.scheduled if s.num_new_tokens == 1 and s.num_computed_tokens > 0]
        decodes.sort(key=lambda s: s.num_computed_tokens)
        prefills = [s for s in plan.scheduled if not (s.num_new_tokens == 1 and s.num_computed_tokens > 0)]
        ordered = decodes + prefills
        graphs = self.decode_graphs
        if graphs is not None and not prefills and len(decodes) <= graphs.max_batch:
            hidden = graphs.run(
                [s.request.all_token_ids[s.num_computed_tokens] for s in decodes],
                [s.num_computed_tokens for s in decodes],
                [s.block_ids for s in decodes],
            )
        else:
            input_ids, positions, meta = self._prepare(decodes, prefills)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)

        # Row of each chunk's last token, in `ordered` order.
        last_rows, row = [], 0
        for s in ordered:
            row += s.num_new_tokens
            last_rows.append(row - 1)
        sampling = [(s, r) for s, r in zip(ordered, last_rows) if s.sample]
        result = StepResult({}, 0.0, swapped_in_ids=swapped_in)
        if sampling:
            rows = torch.tensor([r for _, r in sampling], device=self.device)
            logits = self.model.logits(hidden[rows])
            reqs = [s.request for s, _ in sampling]
            tokens, lps = self.sampler.sample(logits, reqs)
            for req, tok, lp in zip(reqs, tokens, lps):
                result.sampled_token_ids[req.request_id] = tok
                if lp is not None:
                    result.logprobs[req.request_id] = lp
        for s, last in zip(ordered, last_rows):
            if s.request.sampling_params.prompt_logprobs is not None:
                entries = self._prompt_logprobs(s, hidden, last - s.num_new_tokens + 1)
                if entries is not None:
                    result.prompt_logprobs[s.request_id] = entries
        result.elapsed = time.perf_counter() - start
        return result

    def _prepare(
        self, decodes: list[ScheduledRequest], prefills: list[ScheduledRequest]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        bs, dev = self.block_size, self.device
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        seqs: list[SeqSlice] = []
        for s in decodes + prefills:
            begin, end = s.num_computed_tokens, s.context_len
            input_ids.extend(s.request.all_token_ids[begin:end])
            pos = np.arange(begin, end)
            table = np.asarray(s.block_ids, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            seqs.append(SeqSlice(s.num_new_tokens, end, s.block_ids))
        slot_array = np.concatenate(slots)
        meta = self.model.attn.build_metadata(seqs, len(decodes), slot_array, dev, self.dtype)
        ids = torch.tensor(input_ids, device=dev)
        return ids, torch.from_numpy(np.concatenate(positions)).to(dev), meta

    def _prompt_logprobs(
        self, s: ScheduledRequest, hidden: torch.Tensor, first_row: int
    ) -> tuple[int, list[TokenLogprobs]] | None:
        """Logprobs of prompt tokens predicted by this chunk: position p predicts prompt token p + 1."""
        req = s.request
        begin = s.num_computed_tokens
        end = min(s.context_len, req.num_prompt_tokens - 1)
        if end <= begin:
            return None
        rows = hidden[first_row : first_row + (end - begin)]
        logprobs = torch.log_softmax(self.model.logits(rows), dim=-1)
        targets = torch.tensor(req.prompt_token_ids[begin + 1 : end + 1], device=self.device)
        k = req.sampling_params.prompt_logprobs or 0
        return begin + 1, logprob_entries(logprobs, targets, [k] * (end - begin))


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available to this torch ({torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported; use cpu or cuda[:N]")
    return device
