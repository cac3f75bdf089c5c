"""Request outputs (shaped like vLLM's) and the processor that turns engine steps into them.

Text is produced incrementally with `tokenizers`' DecodeStream; stop strings are found here, since the
scheduler works on token ids only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from quanta.engine.core import StepOutput
from quanta.executor.base import TokenLogprobs
from quanta.request import Request, RequestStatus
from quanta.sampling_params import SamplingParams


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    requests: list[Request] = field(default_factory=list, repr=False)  # per-sample timestamps and stats


class IncrementalDetokenizer:
    """Output text of one sample, grown token by token, with stop-string detection."""

    def __init__(self, tokenizer: object, prompt_token_ids: list[int], params: SamplingParams) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer  # a tokenizers.Tokenizer
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        # Prime with the prompt's tail so the first output token decodes in context (leading spaces), one
        # token at a time: a window stepped at once whose text ends inside a character (or in a U+FFFD)
        # leaves the stream waiting, and the first output chunk would carry the window's text with it.
        for token_id in _prompt_tail(tokenizer, prompt_token_ids):
            self._stream.step(tokenizer, token_id)
        self.text = ""
        self._stop = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token; return the stop string it completed, if any (the text is then cut there)."""
        chunk = self._stream.step(self._tokenizer, token_id)
        if not chunk or not check_stop:
            self.text += chunk or ""
            return None
        # Only the new text is searched, plus each stop string's length less one before it (a stop string
        # that straddles the old text and the new), as in vLLM: the old text was searched already, or
        # belongs to the first min_tokens tokens, whose text no stop string may lie wholly inside.
        searched = len(self.text)
        self.text += chunk
        # The stop string that starts first in the text (the list's order breaks ties): cutting at a later
        # one would leave an earlier one in the returned text.
        found = [
            (i, k)
            for k, stop in enumerate(self._stop)
            if (i := self.text.find(stop, max(0, searched - len(stop) + 1))) != -1
        ]
        if not found:
            return None
        i, k = min(found)
        stop = self._stop[k]
        self.text = self.text[: i + len(stop) if self._include_stop else i]
        return stop

    def visible_text(self, finished: bool) -> str:
        """Text safe to show while streaming: a possible stop-string prefix at the end is held back."""
        if finished or not self._hold:
            return self.text
        return self.text[: max(0, len(self.text) - self._hold)]


def _prompt_tail(tokenizer: object, prompt_token_ids: list[int]) -> list[int]:
    """The prompt's last tokens to prime a sample's DecodeStream with, as vLLM picks them: the shortest
    tail of 4 to 23 tokens whose text holds no U+FFFD (it starts and ends on whole characters); else the
    last 4 (a prompt ending inside a character: the output's first characters complete it)."""
    n = len(prompt_token_ids)
    for k in range(min(4, n), min(n, 23) + 1):
        tail = prompt_token_ids[-k:]
        if "\ufffd" not in tokenizer.decode(tail, skip_special_tokens=False):  # type: ignore[attr-defined]
            return tail
    return prompt_token_ids[-4:]


@dataclass(slots=True)
class _Sample:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    logprobs: SampleLogprobs | None
    cumulative_logprob: float | None


@dataclass(slots=True)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    prompt_logprobs: PromptLogprobs | None


class OutputProcessor:
    def __init__(self, tokenizer: object | None, finish: Callable[[str, RequestStatus], None]) -> None:
        self.tokenizer = tokenizer  # tokenizers.Tokenizer or None (the simulator has no text)
        self._finish = finish
        self._parents: dict[str, _Parent] = {}
        self._parent_of: dict[str, tuple[_Parent, int]] = {}

    def add(self, request_id: str, prompt: str | None, children: list[Request]) -> None:
        params = children[0].sampling_params
        samples = [
            _Sample(
                child,
                IncrementalDetokenizer(self.tokenizer, child.prompt_token_ids, params)
                if self.tokenizer and params.detokenize
                else None,
                [] if params.logprobs is not None else None,
                0.0 if params.logprobs is not None else None,
            )
            for child in children
        ]
        prompt_ids = children[0].prompt_token_ids
        plp: PromptLogprobs | None = None
        if params.prompt_logprobs is not None:
            plp = [None] * len(prompt_ids)
        parent = _Parent(request_id, prompt, prompt_ids, params, samples, plp)
        self._parents[request_id] = parent
        for i, child in enumerate(children):
            self._parent_of[child.request_id] = (parent, i)

    def remove(self, request_id: str) -> list[str]:
        """Forget a parent request; returns its children's ids."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        ids = [s.request.request_id for s in parent.samples]
        for child_id in ids:
            del self._parent_of[child_id]
        return ids

    def has(self, request_id: str) -> bool:
        return request_id in self._parents

    def children(self, request_id: str) -> list[Request]:
        """The requests (one per sample) of a tracked parent; empty if it is not tracked."""
        parent = self._parents.get(request_id)
        return [s.request for s in parent.samples] if parent is not None else []

    def parent_id(self, child_id: str) -> str | None:
        """The request id a sample belongs to (itself when n == 1), or None if it is not tracked."""
        found = self._parent_of.get(child_id)
        return found[0].request_id if found is not None else None

    def _decode(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else None

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        return {
            t: Logprob(lp, rank, self._decode(t))
            for t, lp, rank in zip(entry.token_ids, entry.logprobs, entry.ranks)
        }

    def process(self, step: StepOutput, only_finished: bool = False) -> list[RequestOutput]:
        touched: dict[str, _Parent] = {}
        for child_id, (first, entries) in step.result.prompt_logprobs.items():
            parent, _ = self._parent_of[child_id]
            assert parent.prompt_logprobs is not None
            for j, entry in enumerate(entries):
                parent.prompt_logprobs[first + j] = self._logprob_dict(entry)
        for req in step.updated:
            found = self._parent_of.get(req.request_id)
            if found is None:
                continue
            parent, i = found
            sample = parent.samples[i]
            token_id = req.output_token_ids[-1]
            if sample.logprobs is not None:
                entry = step.result.logprobs[req.request_id]
                sample.logprobs.append(self._logprob_dict(entry))
                sample.cumulative_logprob = (sample.cumulative_logprob or 0.0) + entry.logprobs[0]
            params = req.sampling_params
            # The token that stopped the request (eos, a stop token) stays out of the text, as in vLLM,
            # unless the stop is asked for in it.
            stop_token = req.status == RequestStatus.FINISHED_STOPPED and not params.include_stop_str_in_output
            if sample.detokenizer is not None and not stop_token:
                # Stop strings are looked for only after the first min_tokens tokens (vLLM's detokenizer
                # checks once len(output_token_ids) > min_tokens), and not in those tokens' text: a stop
                # string must end in a later token's. Eos and stop token ids may be the min_tokens-th.
                stop = sample.detokenizer.add(token_id, req.num_output_tokens > params.min_tokens)
                if stop is not None:
                    req.stop_reason = stop
                    if not req.finished:
                        self._finish(req.request_id, RequestStatus.FINISHED_STOPPED)
                    elif req.status == RequestStatus.FINISHED_LENGTH:
                        # Its last token completed a stop string: the text ends there, so it stopped (as
                        # vLLM reports it), though its length would have ended it anyway.
                        req.status = RequestStatus.FINISHED_STOPPED
            touched[parent.request_id] = parent
        outputs = []
        for parent in touched.values():
            finished = all(s.request.finished for s in parent.samples)
            if finished or not only_finished:
                outputs.append(self._snapshot(parent, finished))
            if finished:
                self.remove(parent.request_id)
        return outputs

    def _snapshot(self, parent: _Parent, finished: bool) -> RequestOutput:
        completions = []
        for i, s in enumerate(parent.samples):
            req = s.request
            text = s.detokenizer.visible_text(req.finished) if s.detokenizer else ""
            completions.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=list(req.output_token_ids),
                    cumulative_logprob=s.cumulative_logprob,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    finish_reason=req.status.finish_reason,
                    stop_reason=req.stop_reason if req.finished else None,
                )
            )
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=parent.prompt_logprobs,
            outputs=completions,
            finished=finished,
            num_cached_tokens=parent.samples[0].request.num_cached_tokens,
            requests=[s.request for s in parent.samples],
        )
