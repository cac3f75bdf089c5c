"""Sampling over a batch of logits with per-request parameters.

Random draws use the exponential race (argmax of p / E with E ~ Exp(1)), which samples exactly from p
and lets a seeded request draw its noise from its own generator, so its samples do not depend on what
else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quanta.executor.base import TokenLogprobs
from quanta.request import Request
from quanta.sampling_params import SamplingParams


def logprob_entries(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> list[TokenLogprobs]:
    """Entries for rows of `logprobs` [B, V] (already log-softmaxed) and chosen tokens [B]."""
    chosen_lp = logprobs.gather(1, chosen[:, None])
    ranks = (logprobs > chosen_lp).sum(-1) + 1
    k_max = max(num_top, default=0)
    top_lp, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
    chosen_l, chosen_lp_l, ranks_l = chosen.tolist(), chosen_lp[:, 0].tolist(), ranks.tolist()
    top_lp_l = top_lp.tolist() if top_lp is not None else None
    top_ids_l = top_ids.tolist() if top_ids is not None else None
    out = []
    for i, k in enumerate(num_top):
        ids, lps, rks = [chosen_l[i]], [chosen_lp_l[i]], [ranks_l[i]]
        if k:
            assert top_ids_l is not None and top_lp_l is not None
            ids += top_ids_l[i][:k]
            lps += top_lp_l[i][:k]
            rks += list(range(1, k + 1))
        out.append(TokenLogprobs(ids, lps, rks))
    return out


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()  # a random seed: runs differ
        else:
            self.generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}
        # Greedy picks; the CPU kernels' vectorized version replaces it (same first-maximum rule).
        self.argmax: Callable[[torch.Tensor], torch.Tensor] = lambda x: x.argmax(dim=-1)

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def get_state(self, request_id: str) -> bytes | None:
        """A seeded request's generator state (None: it has drawn nothing yet, its seed restarts it)."""
        gen = self._request_generators.get(request_id)
        return None if gen is None else bytes(gen.get_state().numpy().tobytes())

    def set_state(self, request_id: str, state: bytes | None) -> None:
        """Continue a request's draws where another sampler left them (a migrated request)."""
        if state is None:
            self._request_generators.pop(request_id, None)
            return
        gen = torch.Generator(device=self.device)
        gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        self._request_generators[request_id] = gen

    def _generator(self, req: Request) -> torch.Generator:
        gen = self._request_generators.get(req.request_id)
        if gen is None:
            gen = self._request_generators[req.request_id] = torch.Generator(device=self.device)
            gen.manual_seed(req.sampling_params.seed)
        return gen

    def sample(
        self, logits: torch.Tensor, reqs: list[Request]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [B, V] float32, one row per request (the position after its last token)."""
        params = [r.sampling_params for r in reqs]
        want_lp = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        biased = any(p.logit_bias for p in params)
        penalized = any(p.has_penalties for p in params) or any(
            len(r.output_token_ids) < r.sampling_params.min_tokens for r in reqs
        )
        if biased or penalized:  # the common case (none of these) samples from the logits as they are
            logits = logits.clone()
            if biased:  # before penalties, as in vLLM (a bias adds, a repetition penalty scales)
                self._apply_logit_bias(logits, params)
            if penalized:
                self._apply_penalties(logits, reqs)
                self._block_early_stop(logits, reqs)
        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = self.argmax(logits)
        else:
            tokens = self._random_sample(logits, reqs, greedy)
        entries: list[TokenLogprobs | None] = [None] * len(reqs)
        if raw_logprobs is not None:
            rows = [i for i, w in enumerate(want_lp) if w]
            rows_t = torch.tensor(rows, device=logits.device)
            got = logprob_entries(
                raw_logprobs[rows_t], tokens[rows_t], [params[i].logprobs or 0 for i in rows]
            )
            for i, e in zip(rows, got):
                entries[i] = e
        return tokens.tolist(), entries

    def _random_sample(self, logits: torch.Tensor, reqs: list[Request], greedy: list[bool]) -> torch.Tensor:
        params = [r.sampling_params for r in reqs]
        dev = logits.device
        temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=dev)
        x = logits / temps[:, None]
        # vLLM v1's order: temperature, then min_p (an argmax-invariant logits processor), then top_k and
        # top_p on what min_p kept (top_p's cumulative mass is that of the min_p-filtered distribution).
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            x = _apply_min_p(x, min_p)
        if any(p.top_k or p.top_p < 1.0 for p in params):
            vocab = x.shape[-1]
            # Clamped before the tensor: a top_k past int64 (valid JSON, and a valid "keep all") must not
            # fail the step, which would abort every request in it.
            k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=dev)
            top_p = torch.tensor([p.top_p for p in params], device=dev)
            x = _apply_top_k_top_p(x, k, top_p)
        probs = torch.softmax(x, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, req in enumerate(reqs):
            if req.sampling_params.seed is not None and not greedy[i]:
                noise[i].exponential_(generator=self._generator(req))
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            mask = torch.tensor(greedy, device=dev)
            sampled = torch.where(mask, self.argmax(logits), sampled)
        return sampled

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
        """Add every row's logit_bias in one indexed add over the rows that have one."""
        vocab = logits.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for i, p in enumerate(params):
            for token_id, bias in (p.logit_bias or {}).items():
                if token_id < vocab:  # ids are checked against the vocabulary when the request is added
                    rows.append(i)
                    cols.append(token_id)
                    values.append(bias)
        if rows:
            dev = logits.device
            index = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
            logits.index_put_(index, torch.tensor(values, device=dev, dtype=logits.dtype), accumulate=True)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
        for i, req in enumerate(reqs):
            p = req.sampling_params
            if not p.has_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(req.all_token_ids)), device=logits.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if req.output_token_ids and (p.presence_penalty or p.frequency_penalty):
                out = torch.tensor(req.output_token_ids, device=logits.device)
                counts = torch.zeros_like(row).scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _block_early_stop(logits: torch.Tensor, reqs: list[Request]) -> None:
        """Until min_tokens are out, eos and stop tokens cannot be sampled."""
        for i, req in enumerate(reqs):
            p = req.sampling_params
            if len(req.output_token_ids) < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(req.eos_token_ids))
                banned = [t for t in banned if 0 <= t < logits.shape[1]]
                if banned:
                    logits[i, banned] = float("-inf")


def _apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one (per row; min_p 0 drops nothing).
    Never drops a row's most likely token, so greedy picks are unchanged."""
    probs = torch.softmax(x, dim=-1)
    return x.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p[:, None], float("-inf"))


def _apply_top_k_top_p(x: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_x, idx = x.sort(dim=-1)  # ascending
    vocab = x.shape[-1]
    kth = sorted_x.gather(1, (vocab - k)[:, None])
    sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1.0 - top_p)[:, None]
    drop[:, -1] = False  # always keep the most likely token
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, idx, sorted_x)
