"""Sampling semantics that follow vLLM v1: the order of min_p and top_k/top_p, when stop strings start to
count under min_tokens, and the refusal of non-finite float parameters. Unit tests, no model."""

from __future__ import annotations

import math

import pytest
import torch

from quanta.engine.core import StepOutput
from quanta.engine.output import OutputProcessor
from quanta.executor.base import StepResult
from quanta.model.sampler import Sampler
from quanta.request import Request, RequestStatus
from quanta.sampling_params import SamplingParams


def _req(rid: str, **params) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(**params), arrival_time=0.0, eos_token_ids=(0,))


def _support(logits: torch.Tensor, draws: int = 400, **params) -> set[int]:
    """Every token the sampler picks for `logits` [1, V] over many draws (one batch of identical rows)."""
    sampler = Sampler(torch.device("cpu"), seed=0)
    reqs = [_req(f"r{i}", **params) for i in range(draws)]
    tokens, _ = sampler.sample(logits.repeat(draws, 1), reqs)
    return set(tokens)


PROBS = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.10]])


def test_min_p_filters_before_top_p() -> None:
    """vLLM v1 applies min_p first and top_p to the renormalized rest: min_p=0.6 keeps {0, 1, 2} (0.20
    >= 0.18), whose masses are 0.40, 0.33, 0.27, so top_p=0.6 then keeps {0, 1}. The other order (top_p
    first keeps {0, 1, 2}, and min_p keeps them all) also samples token 2."""
    logits = torch.log(PROBS)
    assert _support(logits, temperature=1.0, top_p=0.6, min_p=0.6) == {0, 1}
    # Each filter alone, for reference.
    assert _support(logits, temperature=1.0, min_p=0.6) == {0, 1, 2}
    assert _support(logits, temperature=1.0, top_p=0.6) == {0, 1, 2}


def test_min_p_before_top_p_after_temperature_and_per_row() -> None:
    """Temperature first (it changes which tokens min_p keeps), and each row keeps its own parameters in
    a mixed batch; greedy rows and top_k=1 rows stay the argmax."""
    logits = torch.log(PROBS)
    # temperature 0.5 squares the ratios: p ∝ [.09, .0625, .04, .0225, .01]; min_p=0.4 keeps {0, 1, 2}
    # (0.04 >= 0.036), masses .469, .326, .208; top_p=0.75 keeps {0, 1}.
    assert _support(logits, temperature=0.5, top_p=0.75, min_p=0.4) == {0, 1}
    sampler = Sampler(torch.device("cpu"), seed=0)
    kinds = [
        dict(temperature=1.0, top_p=0.6, min_p=0.6),
        dict(temperature=1.0, top_p=0.6),
        dict(temperature=0.0, top_p=0.6, min_p=0.6),
        dict(temperature=1.5, top_k=1, min_p=0.9, top_p=0.3),
        dict(temperature=1.0),
    ]
    reqs = [_req(f"r{i}", **kinds[i % len(kinds)]) for i in range(len(kinds) * 300)]
    tokens, _ = sampler.sample(logits.repeat(len(reqs), 1), reqs)
    seen: list[set[int]] = [set() for _ in kinds]
    for i, t in enumerate(tokens):
        seen[i % len(kinds)].add(t)
    assert seen == [{0, 1}, {0, 1, 2}, {0}, {0}, {0, 1, 2, 3, 4}]


class _WordTokenizer:
    """A `tokenizers` tokenizer whose tokens are whole strings that decode by plain concatenation."""

    def __new__(cls, words: list[str]):  # type: ignore[misc]
        from tokenizers import Tokenizer, decoders
        from tokenizers.models import WordLevel

        tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
        tok.decoder = decoders.Fuse()
        return tok


WORDS = ["[UNK]", "p", "x", "y", "z", "w"]
P, X, Y, Z, W = 1, 2, 3, 4, 5


def _run(params: SamplingParams, output: list[int]) -> tuple[str, str | int | None, int]:
    """Feed `output` token by token through the output processor, as the engine does; returns the text,
    the stop reason and how many tokens went in before the request stopped."""
    finished: list[str] = []

    def finish(request_id: str, status: RequestStatus) -> None:
        finished.append(request_id)
        req.status = status

    proc = OutputProcessor(_WordTokenizer(WORDS), finish)
    req = Request("r", [P, P], params, arrival_time=0.0)
    proc.add("r", None, [req])
    out = None
    for t in output:
        req.append_output_token(t, 0.0)
        if (status := req.check_stop()) is not None:  # the scheduler's part: max_tokens here
            req.status = status
        (out,) = proc.process(StepOutput(None, StepResult({"r": t}, 0.0), [req], 0.0, 0.0))  # type: ignore[arg-type]
        if req.finished:
            break
    assert out is not None
    return out.outputs[0].text, req.stop_reason, req.num_output_tokens


def test_stop_strings_skip_the_text_of_the_first_min_tokens_tokens() -> None:
    """vLLM checks stop strings once len(output_token_ids) > min_tokens, and only in text past the first
    min_tokens tokens (but for a stop string that straddles into it)."""
    # The min_tokens-th token completes "y": not a stop (it was one, with text "x").
    assert _run(SamplingParams(stop=["y"], min_tokens=2, max_tokens=3), [X, Y, Z]) == ("xyz", None, 3)
    # The next token does count.
    assert _run(SamplingParams(stop=["z"], min_tokens=2, max_tokens=4), [X, Y, Z, W]) == ("xy", "z", 3)
    # A stop string that straddles the min_tokens-th token and the next one counts.
    assert _run(SamplingParams(stop=["yz"], min_tokens=2, max_tokens=4), [X, Y, Z, W]) == ("x", "yz", 3)
    # A short stop string inside the first min_tokens tokens' text stays out of reach, however long the
    # other stop strings are (the overlap searched is each stop string's own length less one).
    assert _run(SamplingParams(stop=["y", "wwww"], min_tokens=2, max_tokens=3), [X, Y, Z]) == ("xyz", None, 3)
    # min_tokens=1: the first token's text is kept (it used to end the output with nothing in it).
    assert _run(SamplingParams(stop=["x"], min_tokens=1, max_tokens=3), [X, X, Y]) == ("x", "x", 2)
    # Without min_tokens the first token may stop the request.
    assert _run(SamplingParams(stop=["x"], max_tokens=3), [X, Y, Z]) == ("", "x", 1)


@pytest.mark.parametrize(
    "name", ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})
    late = SamplingParams()
    setattr(late, name, value)  # set after construction: the engine validates again when it is added
    with pytest.raises(ValueError, match=name):
        late.validate()


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty"])
def test_float_fields_take_numbers(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a number"):
        SamplingParams(**{name: "0.5"})
    assert getattr(SamplingParams(**{name: 2}), name) == 2  # an int is a number
