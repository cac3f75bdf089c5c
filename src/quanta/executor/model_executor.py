"""ModelExecutor: runs a step plan through the torch model, one forward for the whole mixed batch."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from quanta.config import CacheConfig
from quanta.executor.base import StepResult, TokenLogprobs
from quanta.kv.manager import cdiv
from quanta.model.attention import AttentionMetadata, PrefillChunk
from quanta.model.config import ModelConfig
from quanta.model.cpu_kernels import cpu_kernels as load_cpu_kernels
from quanta.model.loader import load_model, resolve_dtype
from quanta.model.sampler import Sampler, logprob_entries
from quanta.sched.plan import ScheduledRequest, StepPlan


class ModelExecutor:
    def __init__(
        self,
        model_path: str | Path,
        cache_config: CacheConfig,
        max_model_len: int,
        max_num_seqs: int,
        dtype: str = "auto",
        device: str = "cpu",
        seed: int = 0,
        model_config: ModelConfig | None = None,
        cpu_kernels: bool = True,
    ) -> None:
        self.model_config = cfg = model_config or ModelConfig.from_folder(model_path)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, cfg)
        self.block_size = bs = cache_config.block_size
        self.model = load_model(model_path, cfg, self.dtype, self.device, bs, max_positions=max_model_len)
        if cpu_kernels and self.device.type == "cpu":
            self.model.use_kernels(load_cpu_kernels())
        if cache_config.num_blocks is not None:
            num_blocks = cache_config.num_blocks
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
        self.sampler = Sampler(self.device, seed)

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        for request_id in plan.finished_ids:
            self.sampler.forget(request_id)
        if plan.is_empty:
            return StepResult({}, time.perf_counter() - start)
        # Decodes first, shortest context first: the attention backend groups them by length.
        decodes = [s for s in plan.scheduled if s.num_new_tokens == 1 and s.num_computed_tokens > 0]
        decodes.sort(key=lambda s: s.num_computed_tokens)
        prefills = [s for s in plan.scheduled if not (s.num_new_tokens == 1 and s.num_computed_tokens > 0)]
        ordered = decodes + prefills
        input_ids, positions, meta = self._prepare(decodes, prefills)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)

        # Row of each chunk's last token, in `ordered` order.
        last_rows, row = [], 0
        for s in ordered:
            row += s.num_new_tokens
            last_rows.append(row - 1)
        sampling = [(s, r) for s, r in zip(ordered, last_rows) if s.sample]
        result = StepResult({}, 0.0)
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
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs, dev = self.block_size, self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in decodes:
            pos = s.num_computed_tokens
            input_ids.append(s.request.all_token_ids[pos])
            positions.append(pos)
            slots.append(s.block_ids[pos // bs] * bs + pos % bs)
        chunks: list[PrefillChunk] = []
        for s in prefills:
            begin, end = s.num_computed_tokens, s.context_len
            chunks.append(
                PrefillChunk(len(input_ids), s.num_new_tokens, end, torch.tensor(s.block_ids, device=dev))
            )
            input_ids.extend(s.request.all_token_ids[begin:end])
            positions.extend(range(begin, end))
            table = s.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
        slot_tensor = torch.tensor(slots, device=dev)
        meta = AttentionMetadata(
            slot_blocks=slot_tensor // bs,
            slot_offsets=slot_tensor % bs,
            prefills=chunks,
        )
        if decodes:
            self.model.attn.plan_decodes(
                [s.block_ids for s in decodes], [s.context_len for s in decodes], dev, meta
            )
        return torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev), meta

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
