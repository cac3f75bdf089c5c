"""A request as the scheduler sees it: tokens, progress, and timestamps from the clock."""

from __future__ import annotations

import enum
from array import array
from dataclasses import dataclass, field

from quanta.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # eos, stop token or stop string
    FINISHED_LENGTH = 4  # max_tokens or the model's context
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class RequestTimes:
    """Clock readings for one request; metrics everywhere are computed from these."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    # One per output token, as C doubles: 8 bytes a token, and read in one pass for metrics (a list's
    # floats lie scattered over the heap by the time a long request finishes).
    tokens: array = field(default_factory=lambda: array("d"))
    finished: float | None = None


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    tenant: str = "default"
    priority: int = 0  # lower value = more important, as in vLLM
    deadline: float | None = None  # absolute clock time by which the request should finish
    slo_class: str | None = None  # names TTFT/TPOT targets a deadline-aware policy derives a deadline from
    session_id: str | None = None
    # Agent programs: the calls of one program share a growing context. An engine may keep a call's KV
    # pinned while its program runs a tool (until the next call, a time-to-live, or the final turn).
    program_id: str | None = None
    tool_name: str | None = None  # the tool the program calls after this turn (keys tool-time statistics)
    final_turn: bool = False  # the program's last call: its KV need not outlive it
    cache_salt: str | None = None  # isolates this request's prefix-cache entries (e.g. per tenant)
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int | None = None  # set by the engine: the request stops when it fills the context

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Prompt followed by outputs; what the model has to have seen before sampling the next token.
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    times: RequestTimes = field(init=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.all_token_ids = list(self.prompt_token_ids)
        self.times = RequestTimes(arrival=self.arrival_time)

    @property
    def program(self) -> str | None:
        """The program (agent session) this call belongs to: program_id, else session_id."""
        return self.program_id if self.program_id is not None else self.session_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        """Tokens whose KV is still missing before the next token can be sampled."""
        return len(self.all_token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.times.first_token is None:
            self.times.first_token = now
        self.times.tokens.append(now)

    def tokens_before_stop(self, token_id: int) -> int:
        """How many more copies of `token_id` can be appended before check_stop would stop the request
        (0 when the token itself stops it): the length of a run of steps the scheduler may plan at once."""
        params = self.sampling_params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            return 0
        n = 1 << 62
        if params.max_tokens is not None:
            n = params.max_tokens - len(self.output_token_ids) - 1
        if self.max_model_len is not None:
            n = min(n, self.max_model_len - len(self.all_token_ids) - 1)
        return max(n, 0)

    def check_stop(self) -> RequestStatus | None:
        """Stop conditions that need no tokenizer: eos, stop token ids, max_tokens, context length."""
        params = self.sampling_params
        n_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n_out >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and n_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_model_len is not None and len(self.all_token_ids) >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
