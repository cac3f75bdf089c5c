"""OpenAI-compatible request bodies (pydantic) and their translation to SamplingParams.

Ranges follow OpenAI's and vLLM's. Unknown fields are ignored, as vLLM does; known fields of the wrong
type or out of range are a 400, and so are known fields that would change the output in ways this server
does not implement (structured output, tools, best_of, beam search, allowed_token_ids, bad_words, ...: see
`unsupported_field`). Of vLLM's own sampling fields, these are applied as vLLM applies them:
truncate_prompt_tokens (keep the prompt's last k tokens), prompt_logprobs (returned in vLLM's shape),
return_tokens_as_token_ids ("token_id:N" in logprobs), stream_options.continuous_usage_stats, and in chat
chat_template (only on a server that trusts request templates, as vLLM's --trust-request-chat-template),
chat_template_kwargs and documents. quanta's extensions
(priority, tenant, deadline_ms, slo_class, session_id, cache_salt) are plain extra body fields, so the
official clients send them through `extra_body`; their sizes are bounded so that a client cannot grow the
scheduler's or the metrics' state without limit.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from quanta.sampling_params import SamplingParams

MAX_LOGPROBS = 20
TENANT_PATTERN = r"^[A-Za-z0-9._:@-]+$"
MAX_TENANT_LEN = 64
MAX_DEADLINE_MS = 86_400_000  # one day
MAX_ID_LEN = 256  # session_id, cache_salt

# Fields of vLLM's structured-output support; any value changes the output, so they are refused here.
GUIDED_FIELDS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    "guided_decoding_backend",
    "structured_outputs",
)


def error_body(message: str, type_: str, code: int | str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    # None: not sent. Then usage is off, unless continuous_usage_stats asks for it (vLLM's include_usage
    # defaults to true, so vLLM sends running usage for {"continuous_usage_stats": true} alone).
    include_usage: bool | None = None
    # vLLM's: every chunk carries the usage so far (prompt_tokens, its choice's completion_tokens so far).
    continuous_usage_stats: bool = False

    @property
    def usage(self) -> bool:
        if self.include_usage is None:
            return self.continuous_usage_stats
        return self.include_usage


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # torch generators take 64-bit seeds
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias in [-100, 100]
    # vLLM's: keep only the prompt's last k tokens (-1: the last max_model_len), as vLLM truncates (left).
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # vLLM's: logprobs of each prompt token (and its k most likely alternatives), in the response.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: tokens in logprobs as "token_id:N" (for tokens whose text is not valid UTF-8 on its own).
    return_tokens_as_token_ids: bool | None = None
    # Known so that they can be refused with a clear 400 (see unsupported_field), not silently ignored.
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    best_of: int | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: sample only among these ids
    use_beam_search: bool = False  # vLLM's beam search
    length_penalty: float = 1.0  # vLLM's: beam search only
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_whitespace_pattern: Any = None
    guided_decoding_backend: Any = None
    structured_outputs: Any = None
    # quanta extensions
    priority: int | None = None  # default 0 (or the nearest value the API key allows); range: server option
    tenant: str | None = Field(None, min_length=1, max_length=MAX_TENANT_LEN, pattern=TENANT_PATTERN)
    deadline_ms: float | None = Field(None, gt=0, le=MAX_DEADLINE_MS)
    # a class the deadline policy knows (its slo_classes): TTFT/TPOT targets
    slo_class: str | None = Field(None, max_length=MAX_TENANT_LEN)
    session_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LEN)
    # agent programs: the calls of one program (default: its session_id) may keep their KV across tool calls
    program_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LEN)
    tool_name: str | None = Field(None, min_length=1, max_length=MAX_ID_LEN)
    final_turn: bool = False
    # as vLLM's: prefix-cache hits only among requests with the same salt
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_ID_LEN)

    def unsupported_field(self) -> str | None:
        """The first field whose value would change the output in a way this server does not implement."""
        if self.response_format is not None and self.response_format.get("type") != "text":
            return "response_format"
        if self.tools and self.tool_choice != "none":  # "none": the template shows them, the answer is text
            return "tools"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        if self.functions:
            return "functions"
        if self.function_call not in (None, "none", "auto"):
            return "function_call"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        # The engine has no mask of allowed tokens and no beam search (length_penalty only scores beams).
        if self.allowed_token_ids is not None:
            return "allowed_token_ids"
        if self.use_beam_search:
            return "use_beam_search"
        if self.length_penalty != 1.0:
            return "length_penalty"
        return next((f for f in GUIDED_FIELDS if getattr(self, f) is not None), None)

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self.logit_bias,  # type: ignore[arg-type]  # SamplingParams parses the string keys
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats: a running usage on every chunk (only with include_usage)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: scoring the prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @property
    def scores_prompt_only(self) -> bool:
        """echo with max_tokens=0: return the prompt (and its logprobs), no completion, as vLLM does."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def unsupported_field(self) -> str | None:
        return "suffix" if self.suffix else super().unsupported_field()

    @property
    def asks_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)

    @property
    def num_prompt_logprobs(self) -> int | None:
        """The alternatives per prompt token in each choice's prompt_logprobs: vLLM's prompt_logprobs, or
        with echo its logprobs (vLLM then computes prompt logprobs, and returns them too)."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None

    def to_sampling_params(self) -> SamplingParams:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo=true, to score the prompt)")
        # The engine computes enough for both: the echoed prompt's logprobs and vLLM's prompt_logprobs.
        plp = max(self.prompt_logprobs or 0, self.logprobs or 0) if self.asks_prompt_logprobs else None
        # Scoring still runs one step: the engine computes prompt logprobs in a prefill that samples a
        # token, which the response then leaves out.
        max_tokens = 1 if self.scores_prompt_only else self.max_tokens
        return self.sampling_params(max_tokens, self.logprobs, plp)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # text parts only
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            content = "\n".join(parts)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = [_template_tool_call(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """Chat templates expect a call's `arguments` as a mapping, while the API sends a JSON string; parse it
    (as vLLM does) when it is a JSON object, and keep it as it is otherwise."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        args = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    if not isinstance(args, dict):
        return call
    return {**call, "function": {**function, "arguments": args}}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    # vLLM's: leave the final (assistant) message open, so the answer continues it (prefilled replies).
    continue_final_message: bool = False
    echo: bool = False  # vLLM's chat echo: known so that it is refused, not ignored
    bad_words: list[str] | None = None  # vLLM's: known so that it is refused (the engine has no such filter)
    # vLLM's: the template to render with (a server option must allow it), extra template variables, and
    # documents for templates that render them (RAG).
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None

    def unsupported_field(self) -> str | None:
        if self.echo:
            return "echo"
        if self.bad_words:
            return "bad_words"
        return super().unsupported_field()

    def template_options(self) -> tuple[bool, bool]:
        """(add_generation_prompt, continue_final_message), checked as vLLM checks them."""
        return _template_options(self.messages, self.add_generation_prompt, self.continue_final_message)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, self.prompt_logprobs)


class TokenizeCompletionRequest(BaseModel):
    """vLLM's POST /tokenize, completion form."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    """vLLM's POST /tokenize, chat form: the prompt the chat template renders."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template adds the special tokens itself
    return_token_strs: bool | None = False
    chat_template: str | None = None  # as in chat requests
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None

    def template_options(self) -> tuple[bool, bool]:
        return _template_options(self.messages, self.add_generation_prompt, self.continue_final_message)


def _template_options(
    messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool
) -> tuple[bool, bool]:
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
    return add_generation_prompt, continue_final_message


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
