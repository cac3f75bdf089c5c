"""SimExecutor: predicts a step's duration with a cost model instead of running a model.

With a VirtualClock, EngineCore then runs quanta's real scheduler, policies and KV manager in simulated
time. Sampled tokens are a fixed id (`token_id`), except that a request listed in `output_lengths`
(request id -> true output length, from the workload) samples its EOS id as its last token there, as the
model would: it finishes "stopped" at its true length, and nothing it carries (max_tokens) reveals that
length to the policies. Requests not listed run to their max_tokens or the context.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from quanta.cluster.transport import KVPayload
from quanta.executor.base import StepResult
from quanta.request import Request
from quanta.sched.plan import StepPlan, first_sample_step


class StepTimeModel(Protocol):
    """How long a plan takes. A model may also define `decode_times(num_seqs, context_tokens)`: for each
    entry of the array context_tokens, the time of a step in which num_seqs requests decode one token
    each after that many cached tokens in all, equal to plan_time of that plan to the last bit; then
    runs of decode steps are priced without plans. And `chunk_time(num_decodes, decode_context, cached,
    new, sample)`: a step in which num_decodes requests decode after decode_context cached tokens in all,
    then one request computes `new` prompt tokens after `cached` (sampling when `sample`), again equal
    to plan_time to the last bit; then runs may carry a prompt's chunks too."""

    def plan_time(self, plan: StepPlan) -> float: ...


class ConstantStepTime:
    """Every step takes the same time: for exercising and timing the scheduler alone."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def plan_time(self, plan: StepPlan) -> float:
        return self.seconds

    def decode_times(self, num_seqs: int, context_tokens: np.ndarray) -> np.ndarray:
        return np.full(len(context_tokens), self.seconds)

    def chunk_time(self, num_decodes: int, decode_context: int, cached: int, new: int, sample: bool) -> float:
        return self.seconds


class ReplayStepTime:
    """Step times read from a recording, in order (to replay a real run in simulated time)."""

    def __init__(self, durations: list[float]) -> None:
        self._durations = iter(durations)

    def plan_time(self, plan: StepPlan) -> float:
        return next(self._durations)


class SimExecutor:
    """Swaps are priced by the cost model's `copy_time` when it has one (free otherwise). Swap-outs
    block the step (their device blocks are reused right away); swap-ins queue on the host link and
    proceed while steps compute, each reported done once the link has carried it."""

    def __init__(
        self,
        cost_model: StepTimeModel,
        num_blocks: int,
        token_id: int = 0,
        record: bool = False,
        num_host_blocks: int = 0,
        block_size: int = 16,
        output_lengths: Mapping[str, int] | None = None,
    ) -> None:
        self.cost_model = cost_model
        self._num_blocks = num_blocks
        self.num_host_kv_blocks = num_host_blocks
        self.block_size = block_size
        self.token_id = token_id
        # Kept by reference, not copied: all replicas of a simulation share its one mapping.
        self.output_lengths: Mapping[str, int] = {} if output_lengths is None else output_lengths
        self.plans: list[StepPlan] | None = [] if record else None  # every plan executed, when recording
        self._swap_ins: deque[list] = deque()  # [request ids, seconds of link time left], FIFO
        self.swap_seconds = 0.0  # link time spent on copies
        self.num_copy_calls = 0  # one per run, per layer tensor (as the cost model counts them)

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    def _next_token(self, req: Request) -> int:
        return self._next_token_at(req, 0)

    def _next_token_at(self, req: Request, ahead: int) -> int:
        """The token `req` samples `ahead` tokens from now (0: the next one)."""
        n = self.output_lengths.get(req.request_id)
        if n is None or req.num_output_tokens + ahead + 1 < n:
            return self.token_id
        if not req.eos_token_ids:
            raise ValueError(f"request {req.request_id!r} has a true output length but no EOS token id")
        return req.eos_token_ids[0]

    # ---- live migration: payloads have a size only (a simulated transport prices them) ----------------
    def read_kv_blocks(self, block_ids: list[int]) -> KVPayload:
        per_token = getattr(self.cost_model, "kv_bytes_per_token", None)
        per_block = int(per_token() * self.block_size) if per_token is not None else 0
        return KVPayload(len(block_ids), per_block * len(block_ids), None)

    def write_kv_blocks(self, block_ids: list[int], payload: KVPayload) -> None:
        assert payload.num_blocks == len(block_ids), "payload and block table differ in length"

    def get_generator_state(self, request_id: str) -> bytes | None:
        return None

    def set_generator_state(self, request_id: str, state: bytes | None) -> None:
        pass

    def _copy_time(self, runs: list[tuple[int, int, int]]) -> float:
        copy_time = getattr(self.cost_model, "copy_time", None)
        if copy_time is None or not runs:
            return 0.0
        tokens = sum(n for _, _, n in runs) * self.block_size
        model = getattr(self.cost_model, "model", None)
        self.num_copy_calls += len(runs) * 2 * (model.num_layers if model is not None else 1)
        seconds = copy_time(len(runs), tokens)
        self.swap_seconds += seconds
        return seconds

    def decode_run(
        self, requests: Sequence[Request], limit: int, chunks: Sequence[int] = ()
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Durations of up to `limit` steps of `requests` that execute() would run the same way (no
        swap-in pending; each request decodes and samples `token_id`, except that the last step may be
        the one where some sample their EOS; with `chunks`, the last request computes those prompt chunks
        in the first steps, sampling from the step of the chunk that completes its prompt), priced as
        execute() prices them; and those EOS tokens of the last step (request id -> token). Empty when
        the cost model cannot price such steps without plans, or plans are recorded."""
        decode_times = getattr(self.cost_model, "decode_times", None)
        chunk_time = getattr(self.cost_model, "chunk_time", None)
        if decode_times is None or self._swap_ins or self.plans is not None or (chunks and chunk_time is None):
            return np.empty(0), {}
        lengths = self.output_lengths
        k = len(chunks)
        prompt = requests[-1] if chunks else None
        # Before step first_sample, the prompt samples nothing (never, where its chunks do not complete it).
        first_sample = 0
        if prompt is not None:
            first = first_sample_step(prompt, chunks)
            first_sample = limit if first is None else first
        for req in requests:
            n = lengths.get(req.request_id)
            if n is not None:  # up to the step that samples its EOS (its n-th token)
                limit = min(limit, n - req.num_output_tokens + (first_sample if req is prompt else 0))
        if limit < 1:
            return np.empty(0), {}
        last = {}
        for req in requests:
            ahead = limit - 1 - (first_sample if req is prompt else 0)  # samples before the last step's
            if ahead >= 0 and lengths.get(req.request_id) == req.num_output_tokens + ahead + 1:
                last[req.request_id] = self._next_token_at(req, ahead)
        num_seqs = len(requests)
        context = sum(r.num_computed_tokens for r in requests)
        if prompt is None:
            return decode_times(num_seqs, context + num_seqs * np.arange(limit, dtype=np.int64)), last
        # The chunk steps: the decodes' context grows by one token each a step, the prompt's by its chunk.
        decodes, cached = num_seqs - 1, prompt.num_computed_tokens
        decode_context = context - cached
        times = np.empty(limit)
        for j in range(min(k, limit)):
            times[j] = chunk_time(decodes, decode_context + decodes * j, cached, chunks[j], j == first_sample)  # type: ignore[misc]
            cached += chunks[j]
        if limit > k:  # then every request decodes: the prompt's context counts from its last chunk on
            base = decode_context + decodes * k + cached
            times[k:] = decode_times(num_seqs, base + num_seqs * np.arange(limit - k, dtype=np.int64))
        return times, last

    def execute(self, plan: StepPlan) -> StepResult:
        if self.plans is not None:
            self.plans.append(plan)
        sampled = {s.request.request_id: self._next_token(s.request) for s in plan.scheduled if s.sample}
        elapsed = self._copy_time(plan.swap_out)
        if plan.swap_in_ids:
            self._swap_ins.append([plan.swap_in_ids, self._copy_time(plan.swap_in)])
        compute = self.cost_model.plan_time(plan) if plan.scheduled else 0.0
        if compute == 0.0 and self._swap_ins:
            compute = self._swap_ins[0][1]  # nothing else to run: wait for the next swap-in to land
        elapsed += compute
        done: list[str] = []
        link = compute  # link time available while this step computes
        while self._swap_ins and self._swap_ins[0][1] <= link + 1e-12:
            ids, seconds = self._swap_ins.popleft()
            link -= seconds
            done.extend(ids)
        if self._swap_ins:
            self._swap_ins[0][1] -= link
        return StepResult(sampled, elapsed, swapped_in_ids=done)
