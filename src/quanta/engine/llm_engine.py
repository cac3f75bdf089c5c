"""LLMEngine: tokenizer + EngineCore (ModelExecutor, wall clock) + output processing.

The offline `LLM` and the server's async front end are thin layers over this. `EngineFrontend` is the part
that needs no engine (prompts to requests, outputs to text); `quanta.cluster.ClusterEngine` is the other
engine behind it, with its instances elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import Clock, WallClock
from quanta.engine.core import EngineCore, StepFailedError, StepOutput
from quanta.engine.output import OutputProcessor, RequestOutput
from quanta.engine.tokenizer import Tokenizer
from quanta.model.config import ModelConfig
from quanta.request import Request, RequestStatus
from quanta.sampling_params import SamplingParams

logger = logging.getLogger("quanta")

PromptType = str | list[int] | dict[str, Any]


@dataclass(slots=True)
class EngineArgs:
    model: str | None = None  # HF folder or GGUF file; None: the default model (SmolLM2 when installed)
    dtype: str = "auto"
    device: str = "cpu"
    policy: str = "sarathi"
    max_num_batched_tokens: int | None = None  # default: 512 for chunked policies, max_model_len otherwise
    max_num_seqs: int | None = None  # default: 128, or the token budget when that is smaller
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    enable_prefix_caching: bool = True
    prefix_cache_per_tenant: bool = False  # prefix-cache hits only between requests of one tenant
    prefix_cache_hash: str = "sha256"  # CacheConfig.prefix_cache_hash
    seed: int | None = 0  # None: a random seed (runs differ, as vLLM's seed=None)
    cpu_kernels: bool = True  # C++ CPU kernels: decode attention, AMX linears (built on first use); False: torch
    attention_backend: str = "auto"  # torch | triton; auto: triton on CUDA, torch on CPU
    gpu_memory_utilization: float = 0.9  # CUDA: share of the card's memory for weights, activations and KV
    cuda_graphs: bool | None = None  # decode steps from CUDA graphs; None: on CUDA with the triton backend
    load_format: str = "auto"  # auto: the folder's safetensors; dummy: random weights (benchmarks)
    check_integrity: bool = False  # verify the KV pool after every step (tests)
    preemption_mode: str = "recompute"  # or "swap": preempted KV goes to host memory and comes back
    swap_space_gb: float = 0.0  # host memory for swapped KV (or num_cpu_blocks blocks)
    num_cpu_blocks: int | None = None
    policy_args: dict | None = None  # policy settings, e.g. {"tenant_weights": {"a": 2.0}}

    def __post_init__(self) -> None:
        self.dtype = _DTYPE_ALIASES.get(str(self.dtype), str(self.dtype))  # vLLM's spellings, torch dtypes
        # None means "the default"; 0 or less is an error, not the default (checked before any loading).
        for name, least in SIZE_MINIMUMS:
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        # The sampler's torch generator takes a 64-bit seed (a larger one failed at the first step).
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if not 0 < self.kv_cache_memory_gb < math.inf:  # (nan fails this too)
            raise ValueError(f"kv_cache_memory_gb must be a positive, finite number, got {self.kv_cache_memory_gb}")


# The engine's sizes and their least values (the CLI checks its flags against these too).
SIZE_MINIMUMS = (("max_model_len", 2), ("max_num_seqs", 1), ("max_num_batched_tokens", 1))

_DTYPE_ALIASES = {
    "half": "float16", "fp16": "float16", "torch.float16": "float16",
    "float": "float32", "fp32": "float32", "torch.float32": "float32",
    "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
}  # fmt: skip


@dataclass(slots=True)
class EngineState:
    """Counts and KV occupancy, for /metrics, /internal/state and the waiting-queue limits."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    kv_usage: float
    integrity_ok: bool
    integrity_error: str | None = None
    waiting_prompt_tokens: int = 0
    instances: list[dict[str, Any]] | None = None  # per instance, for a cluster
    cluster: dict[str, Any] | None = None  # a cluster's own counters (migrations, re-dispatches, Ray address)
    counters: CacheCounters | None = None  # as of this reading (a scrape on an idle engine sees them too)


@dataclass(slots=True)
class CacheCounters:
    """Cumulative counters the server turns into Prometheus increments."""

    prefix_queries: int  # blocks looked up in the prefix cache
    prefix_hits: int
    preemptions: int


def default_budget(args: EngineArgs, max_model_len: int) -> int:
    if args.max_num_batched_tokens is not None:
        return args.max_num_batched_tokens
    return max_model_len if args.policy == "prefill-first" else 512


class EngineFrontend(ABC):
    """Prompts to requests and engine steps to outputs; the engine behind it is the subclass's."""

    def __init__(self, args: EngineArgs) -> None:
        from quanta.model.default_model import default_model
        from quanta.model.loader import model_path

        if args.model is None:
            args = dataclasses.replace(args, model=default_model())
        self.args = args
        self.model_dir = model_path(args.model, args.dtype, args.device)
        self.model_config = ModelConfig.from_folder(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        self.eos_token_ids = tuple(self.model_config.eos_token_ids) or (
            (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        )
        self.output_processor = OutputProcessor(self.tokenizer.backend, self.finish_request)

    def model_max_len(self) -> int:
        """max_model_len as asked for (checked against the model), before the KV pool may lower it."""
        max_model_len = self.args.max_model_len
        if max_model_len is None:
            max_model_len = self.model_config.max_position_embeddings
        if max_model_len > self.model_config.max_position_embeddings:
            window = self.model_config.sliding_window
            why = ", its sliding window: quanta attends fully, as the window does up to it" if window else ""
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's context "
                f"({self.model_config.max_position_embeddings}{why})"
            )
        return max_model_len

    def to_token_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Text or token ids (or vLLM-style {"prompt": ...} / {"prompt_token_ids": ...}) to token ids."""
        text: str | None = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:  # with its text beside it (the prompt a chat rendered), if given
                text = prompt["prompt"] if isinstance(prompt.get("prompt"), str) else None
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"token id {t!r} is out of range for a vocabulary of {vocab}")
        return text, ids

    def check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        bad = sorted(t for t in params.logit_bias or {} if t >= vocab)
        if bad:
            raise ValueError(f"logit_bias has token ids out of range for a vocabulary of {vocab}: {bad[:5]}")

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        *,
        tenant: str = "default",
        priority: int = 0,
        deadline: float | None = None,
        session_id: str | None = None,
        slo_class: str | None = None,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        program_id: str | None = None,
        tool_name: str | None = None,
        final_turn: bool = False,
    ) -> None:
        if self.output_processor.has(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self.to_token_ids(prompt)
        if not token_ids:
            raise ValueError("prompt must contain at least one token")
        params.validate()  # again: a field set after construction is checked before the engine runs it
        vocab = self.model_config.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"{name} asks for {k} alternatives; the vocabulary has {vocab}")
        self.check_logit_bias(params)
        now = self.now() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                # Each sample is its own request; distinct seeds keep seeded samples reproducible yet different.
                seed = None if params.seed is None else params.seed + i
                child_params = dataclasses.replace(params, n=1, seed=seed)
            children.append(
                Request(
                    request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                    prompt_token_ids=token_ids,
                    sampling_params=child_params,
                    arrival_time=now,
                    tenant=tenant,
                    priority=priority,
                    deadline=deadline,
                    session_id=session_id,
                    slo_class=slo_class,
                    cache_salt=cache_salt,
                    program_id=program_id,
                    tool_name=tool_name,
                    final_turn=final_turn,
                    eos_token_ids=self.eos_token_ids,
                )
            )
        self._submit(children)
        self.output_processor.add(request_id, text, children)

    def abort_request(self, request_ids: list[str] | str) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self._abort(self.output_processor.remove(request_id))

    def _drop_failed(self, child_ids: list[str]) -> list[str]:
        """Forget the parents of failed samples; a parent's other samples cannot complete it, so abort them."""
        parents = dict.fromkeys(p for c in child_ids if (p := self.output_processor.parent_id(c)) is not None)
        self.abort_request(list(parents))
        return list(parents)

    # ---- what the engine behind provides -----------------------------------------------------------
    @property
    @abstractmethod
    def max_model_len(self) -> int: ...

    @property
    def block_size(self) -> int:
        return self.args.block_size

    @abstractmethod
    def now(self) -> float: ...

    @abstractmethod
    def _submit(self, children: list[Request]) -> None:
        """Hand new requests to the engine (all or none: ValueError leaves none behind)."""

    @abstractmethod
    def _abort(self, child_ids: list[str]) -> None: ...

    @abstractmethod
    def finish_request(self, child_id: str, status: RequestStatus) -> None:
        """Stop a request for a reason found here (a stop string)."""

    @abstractmethod
    def has_unfinished_requests(self) -> bool: ...

    @abstractmethod
    def step(self, only_finished: bool = False) -> list[RequestOutput]: ...

    def requests_of(self, request_id: str) -> list[Request]:
        """The requests (one per sample) behind a request id."""
        return self.output_processor.children(request_id)

    @abstractmethod
    def state(self, check: bool = True) -> EngineState: ...

    @abstractmethod
    def waiting_load(self) -> tuple[int, int]:
        """Requests waiting to be admitted and their prompt tokens (the server's queue limits)."""

    @abstractmethod
    def counters(self) -> CacheCounters: ...

    @abstractmethod
    def add_step_observer(self, observe: Callable[[StepOutput], None]) -> None: ...

    @abstractmethod
    def reset_prefix_cache(self) -> bool: ...

    def shutdown(self) -> None:
        """Release what the engine holds beyond this process (a cluster's instances)."""
        return None  # a single engine holds nothing beyond it

    def healthy(self) -> bool:
        """Whether the engine can serve (a cluster: some instance is alive)."""
        return True

    def idle_wait(self) -> float | None:
        """Seconds until the idle engine has something to do by itself (see EngineCore.idle_wait)."""
        return None

    def on_idle(self) -> None:  # noqa: B027 - most frontends have nothing to do then
        """What time does by itself while no request runs (see EngineCore.on_idle)."""


class LLMEngine(EngineFrontend):
    def __init__(self, args: EngineArgs, clock: Clock | None = None) -> None:
        from quanta.executor.model_executor import ModelExecutor

        super().__init__(args)
        args = self.args
        max_model_len = self.model_max_len()
        budget = default_budget(args, max_model_len)
        max_num_seqs = args.max_num_seqs if args.max_num_seqs is not None else min(128, budget)
        # The scheduler's settings are checked before the KV pool is sized with them (and the weights load).
        SchedulerConfig(
            policy=args.policy,
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            preemption_mode=args.preemption_mode,
        )
        cache_config = CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            kv_cache_memory_gb=args.kv_cache_memory_gb,
            enable_prefix_caching=args.enable_prefix_caching,
            prefix_cache_per_tenant=args.prefix_cache_per_tenant,
            prefix_cache_hash=args.prefix_cache_hash,
            swap_space_gb=args.swap_space_gb,
            num_cpu_blocks=args.num_cpu_blocks,
        )
        executor = ModelExecutor(
            self.model_dir,
            cache_config,
            max_model_len,
            max_num_seqs,
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
            model_config=self.model_config,
            cpu_kernels=args.cpu_kernels,
            attention_backend=args.attention_backend,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_batched_tokens=budget,
            cuda_graphs=args.cuda_graphs,
            load_format=args.load_format,
        )
        pool_tokens = executor.num_kv_blocks * args.block_size
        if pool_tokens < max_model_len and args.max_model_len is None:
            logger.warning(
                "KV pool holds %d tokens: lowering max_model_len from %d", pool_tokens, max_model_len
            )
            max_model_len = pool_tokens
            budget = min(budget, max_model_len) if args.policy != "prefill-first" else max_model_len
        self.scheduler_config = SchedulerConfig(
            policy=args.policy,
            max_num_batched_tokens=budget,
            max_num_seqs=args.max_num_seqs if args.max_num_seqs is not None else min(128, budget),
            max_model_len=max_model_len,
            preemption_mode=args.preemption_mode,
            # A copy; anything but a dict reaches make_policy, which says what is wrong with it.
            policy_args=dict(args.policy_args) if isinstance(args.policy_args, dict) else args.policy_args or {},
        )
        self.core = EngineCore(
            executor,
            clock or WallClock(),
            self.scheduler_config,
            cache_config,
            check_integrity=args.check_integrity,
        )
        self.executor = executor

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    def now(self) -> float:
        return self.core.clock.now()

    def _submit(self, children: list[Request]) -> None:
        added: list[Request] = []
        try:
            for child in children:
                self.core.add_request(child)
                added.append(child)
        except ValueError:
            self.core.abort_requests(c.request_id for c in added)
            raise

    def _abort(self, child_ids: list[str]) -> None:
        self.core.abort_requests(child_ids)

    def finish_request(self, child_id: str, status: RequestStatus) -> None:
        self.core.finish_request(child_id, status)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Run one engine step and return the outputs of the requests it advanced.

        If the executor fails, only the requests of that step are lost: they are aborted (with their n > 1
        siblings) and StepFailedError is raised naming their (parent) request ids. Every other request
        stays queued, so the caller may report the failure and go on stepping. The offline `LLM` lets the
        error propagate (and aborts what is left).
        """
        try:
            out: StepOutput = self.core.step()
        except StepFailedError as e:
            raise StepFailedError(self._drop_failed(e.request_ids), e.__cause__ or e) from e.__cause__
        return self.output_processor.process(out, only_finished=only_finished)

    def state(self, check: bool = True) -> EngineState:
        core = self.core
        if not core.has_unfinished():
            core.on_idle()  # as of now: pins past their time-to-live are gone
        error = None
        try:
            if check:
                core.scheduler.check_integrity()
        except AssertionError as e:
            error = str(e) or "integrity check failed"
        waiting = core.scheduler.waiting
        return EngineState(
            num_running=len(core.scheduler.running),
            num_waiting=len(waiting),
            num_free_blocks=core.kv.num_free_blocks,
            num_blocks=core.kv.num_blocks,
            kv_usage=core.kv.usage(),
            integrity_ok=error is None,
            integrity_error=error,
            waiting_prompt_tokens=sum(r.num_prompt_tokens for r in waiting),
            counters=self.counters(),
        )

    def waiting_load(self) -> tuple[int, int]:
        waiting = self.core.scheduler.waiting
        return len(waiting), sum(r.num_prompt_tokens for r in waiting)

    def counters(self) -> CacheCounters:
        pool = self.core.kv.pool
        return CacheCounters(pool.num_cache_queries, pool.num_cache_hits, self.core.scheduler.num_preemptions)

    def add_step_observer(self, observe: Callable[[StepOutput], None]) -> None:
        self.core.step_observers.append(observe)

    def reset_prefix_cache(self) -> bool:
        self.core.on_idle()  # pins past their time-to-live hold no blocks any more
        return self.core.kv.reset_prefix_cache()

    def idle_wait(self) -> float | None:
        return self.core.idle_wait()

    def on_idle(self) -> None:
        self.core.on_idle()
