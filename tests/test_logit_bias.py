"""logit_bias (OpenAI's semantics) on the real engine: a bias is added to a token's logit before sampling,
only for the requests that ask for it; logprobs stay those of the model's own output (vLLM's default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from quanta import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(model=str(llama_dir), cpu_kernels=False, max_model_len=256, num_kv_blocks=128)


PROMPTS = [[5, 6, 7, 8], [100, 200, 300], [11, 12]]


def _greedy(llm: LLM, bias: list[dict[int, float] | None], **kw) -> list[list[int]]:  # type: ignore[no-untyped-def]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias=b, **kw) for b in bias]
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_bias_forces_and_bans_tokens_per_request(llm: LLM) -> None:
    plain = _greedy(llm, [None, None, None])
    forced = next(t for t in range(40, 60) if t not in plain[0])
    # One batch: a forced row, a banned row and an untouched row.
    got = _greedy(llm, [{forced: 100.0}, {plain[1][0]: -100.0}, None])
    assert got[0] == [forced] * 6
    assert got[1][0] != plain[1][0]
    assert got[2] == plain[2]  # the other rows of the batch sample as if no bias existed
    # A bias that does not change the winner changes nothing; sampled (not greedy) rows honour it too.
    assert _greedy(llm, [{plain[0][0]: 0.5}, None, None])[0][0] == plain[0][0]
    sampled = llm.generate(
        PROMPTS[0],
        SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True, n=2, logit_bias={forced: 100}),
        use_tqdm=False,
    )
    assert all(o.token_ids == [forced] * 6 for o in sampled[0].outputs)


def test_logprobs_are_the_models_own(llm: LLM) -> None:
    plain = _greedy(llm, [None, None, None])
    forced = next(t for t in range(40, 60) if t not in plain[0])
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=1, logit_bias={forced: 100.0})
    out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    entry = out.logprobs[0]
    assert out.token_ids == [forced]
    assert entry[forced].rank > 1  # the unbiased model did not prefer it
    assert entry[plain[0][0]].rank == 1 and entry[plain[0][0]].logprob > entry[forced].logprob


@pytest.mark.parametrize(
    "bias,match",
    [
        ({1: 100.5}, r"\[-100, 100\]"),
        ({-1: 1.0}, "non-negative"),
        ({"x": 1.0}, "token ids"),
        ({1: float("inf")}, "finite"),
        ({1: "a"}, "numbers"),
    ],
)
def test_bad_bias_is_refused(bias: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(logit_bias=bias)


def test_out_of_vocabulary_ids_are_refused_before_they_run(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([1, 2], SamplingParams(logit_bias={vocab: 1.0}), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert SamplingParams(logit_bias={"7": 2}).logit_bias == {7: 2.0}  # JSON's string keys
    assert SamplingParams(logit_bias={}).logit_bias is None
