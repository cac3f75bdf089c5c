"""Sampling features end to end on the real model path, and the sampler's pieces in isolation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import hf_model
from quanta import LLM, SamplingParams
from quanta.engine.llm_engine import EngineArgs, LLMEngine
from quanta.model.sampler import Sampler
from quanta.request import Request


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(
        str(llama_dir), num_kv_blocks=600, max_model_len=512, max_num_batched_tokens=64, check_integrity=True
    )


PROMPTS = [[5, 6, 7, 8, 9, 10], list(range(20, 80)), [100], list(range(200, 233))]


def tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def test_same_seed_same_samples_regardless_of_batch(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = tokens(llm.generate([PROMPTS[1]], p, use_tqdm=False))
    again = tokens(llm.generate([PROMPTS[1]], p, use_tqdm=False))
    batched = tokens(
        llm.generate(PROMPTS, [SamplingParams(temperature=1.0, max_tokens=20), p, p, p], use_tqdm=False)
    )
    assert alone == again
    assert batched[1] == alone[0]
    other = tokens(
        llm.generate(
            [PROMPTS[1]],
            SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True),
            use_tqdm=False,
        )
    )
    assert other != alone


def test_top_k_one_is_greedy(llm: LLM) -> None:
    greedy = tokens(llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False))
    top1 = tokens(
        llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=10), use_tqdm=False)
    )
    assert greedy == top1


def test_n_samples_share_prompt_blocks(llama_dir: Path) -> None:
    engine = LLMEngine(EngineArgs(str(llama_dir), num_kv_blocks=200, max_model_len=512, check_integrity=True))
    prompt = list(range(30, 30 + 70))  # 4 full blocks of 16 and a partial one
    engine.add_request(
        "r", prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    )
    engine.step()
    kv = engine.core.kv
    tables = [kv.block_ids(f"r#{i}") for i in range(4)]
    for table in tables[1:]:
        assert table[:4] == tables[0][:4]
    assert [kv.pool.blocks[b].ref_cnt for b in tables[0][:4]] == [4] * 4
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step(only_finished=True)
    (out,) = outs
    assert len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "seeded samples should differ from each other"
    assert kv.num_free_blocks == kv.num_blocks


def test_stop_strings_and_stop_tokens(llm: LLM) -> None:
    base = llm.generate(
        PROMPTS[1:2], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False
    )[0]
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    stop = text[5:8]
    assert stop and stop in text
    cut = llm.generate(
        PROMPTS[1:2],
        SamplingParams(temperature=0.0, max_tokens=30, stop=[stop], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(
        PROMPTS[1:2],
        SamplingParams(
            temperature=0.0, max_tokens=30, stop=[stop], include_stop_str_in_output=True, ignore_eos=True
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    held = llm.generate(
        PROMPTS[1:2],
        SamplingParams(temperature=0.0, max_tokens=30, stop=[stop], min_tokens=20, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(held.token_ids) >= 20  # stop strings wait for min_tokens, like eos
    by_token = llm.generate(
        PROMPTS[1:2],
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[ids[3]], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert by_token.token_ids == ids[: ids.index(ids[3]) + 1]
    assert by_token.finish_reason == "stop" and by_token.stop_reason == ids[3]


@pytest.fixture(scope="module")
def eos_llm(eos_llama_dir: Path) -> LLM:
    return LLM(
        str(eos_llama_dir),
        num_kv_blocks=400,
        max_model_len=512,
        max_num_batched_tokens=64,
        check_integrity=True,
    )


def eos_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 90, 3, 8, 12, 25, 60)]


def hf_greedy_min(path: Path, prompt: list[int], max_tokens: int, min_tokens: int, eos: list[int]) -> list[int]:
    """transformers' greedy output; `min_new_tokens` masks every id of `eos` for the first steps."""
    with torch.no_grad():
        ids = hf_model(path).generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            min_new_tokens=min_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    return ids[0, len(prompt) :].tolist()


def test_min_tokens_holds_back_eos_like_transformers(eos_llm: LLM, eos_llama_dir: Path) -> None:
    eos = list(eos_llm.engine.eos_token_ids)
    assert sorted(eos) == [0, 2]  # <|endoftext|> and <|im_end|>, both from generation_config.json
    prompts = eos_prompts()

    def greedy(**kw) -> list:
        params = SamplingParams(temperature=0.0, max_tokens=20, **kw)
        return [o.outputs[0] for o in eos_llm.generate(prompts, params, use_tqdm=False)]

    # Without min_tokens the model stops at eos within a few tokens (right away on most prompts).
    free = greedy()
    for p, c in zip(prompts, free):
        ref = hf_greedy_min(eos_llama_dir, p, 20, 0, eos)
        assert len(ref) <= 4 and ref[-1] in eos, "the fixture model should emit eos early"
        assert c.token_ids == ref
        assert c.finish_reason == "stop" and c.stop_reason is None
    assert sum(len(c.token_ids) == 1 for c in free) >= len(prompts) // 2
    # With min_tokens=k, neither eos id may appear among the first k tokens; those k tokens (and the eos
    # that follows) are transformers' greedy tokens with eos masked for k steps.
    for k in (1, 6):
        for p, c in zip(prompts, greedy(min_tokens=k)):
            assert not set(c.token_ids[:k]) & set(eos), (k, c.token_ids)
            assert c.token_ids == hf_greedy_min(eos_llama_dir, p, 20, k, eos), k
            assert len(c.token_ids) > k and c.token_ids[-1] in eos  # eos comes right after the hold
            assert c.finish_reason == "stop" and c.stop_reason is None


def test_stop_token_ids_wait_for_min_tokens(eos_llm: LLM, eos_llama_dir: Path) -> None:
    """ignore_eos with <|im_end|> as a stop token: <|endoftext|> no longer ends the output, <|im_end|>
    does, and only once min_tokens are out (transformers with eos_token_id=<|im_end|> is the reference)."""
    prompts = eos_prompts()
    im_end, endoftext = 2, 0
    for k in (0, 5):
        params = SamplingParams(
            temperature=0.0, max_tokens=20, min_tokens=k, ignore_eos=True, stop_token_ids=[im_end]
        )
        outs = [o.outputs[0] for o in eos_llm.generate(prompts, params, use_tqdm=False)]
        for p, c in zip(prompts, outs):
            ref = hf_greedy_min(eos_llama_dir, p, 20, k, [im_end])
            assert c.token_ids == ref, k
            assert im_end not in c.token_ids[:k]
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == im_end and c.stop_reason == im_end
                assert im_end not in c.token_ids[:-1]
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == 20
        assert sum(c.finish_reason == "stop" for c in outs) >= 3
        assert any(endoftext in c.token_ids for c in outs), "the ignored eos should be sampled and kept"


def test_min_and_max_tokens_and_eos(eos_llm: LLM) -> None:
    """Temperature sampling on the model that emits eos early: counts, and no eos before min_tokens."""
    eos = set(eos_llm.engine.eos_token_ids)
    prompts = eos_prompts()

    def sample(**kw) -> list:
        params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=40, **kw) for i in range(30)]
        return [o.outputs[0] for o in eos_llm.generate(prompts * 3, params, use_tqdm=False)]

    free = sample()
    assert sum(len(c.token_ids) < 8 for c in free) >= len(free) // 2, "eos should come early when sampling"
    for c in free:
        assert c.finish_reason == "length" or (c.finish_reason == "stop" and c.token_ids[-1] in eos)
    held = sample(min_tokens=8)
    for c in held:
        assert 8 <= len(c.token_ids) <= 40
        assert not set(c.token_ids[:8]) & eos
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in eos and not set(c.token_ids[:-1]) & eos
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 40
    assert sum(c.finish_reason == "stop" for c in held) >= len(held) * 3 // 4
    forced = eos_llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True), use_tqdm=False
    )
    for o in forced:
        c = o.outputs[0]
        assert len(c.token_ids) == 25 and c.finish_reason == "length"
        assert set(c.token_ids) & eos, "eos is sampled but does not stop the output"


def test_text_prompts_and_chat(llm: LLM) -> None:
    out = llm.generate("Hello there", SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0]
    assert out.prompt == "Hello there"
    assert out.prompt_token_ids == llm.get_tokenizer().encode("Hello there")
    chat = llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False
    )[0]
    assert chat.prompt_token_ids[-3:] == llm.get_tokenizer().encode("<|im_start|>assistant\n")[-3:]
    assert chat.prompt is not None and chat.prompt.endswith("<|im_start|>assistant\n")  # the rendered text
    prefilled = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]
    cont = llm.chat(
        prefilled, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False,
        add_generation_prompt=False, continue_final_message=True,
    )[0]  # fmt: skip
    assert cont.prompt is not None and cont.prompt.endswith("Well,")


def test_bad_input_is_a_clear_error_and_leaks_nothing(llm: LLM) -> None:
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2, 10**6]], use_tqdm=False)
    with pytest.raises(ValueError, match="longer than the context"):
        llm.generate([[5] * 600], use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    # A bad prompt in a batch leaves nothing of the good ones behind.
    with pytest.raises(ValueError):
        llm.generate([[5, 6], [5] * 600], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
    # ... whatever the error (a TypeError here).
    with pytest.raises(TypeError):
        llm.generate(["ok", None], use_tqdm=False)  # type: ignore[list-item]
    assert not llm.engine.has_unfinished_requests()
    # Values of the wrong type, or too many logprobs, are refused when added: not in the engine's step,
    # which would fail every request of that step.
    with pytest.raises(ValueError, match="n must be an integer"):
        SamplingParams(n=2.0)  # type: ignore[arg-type]
    bad = SamplingParams(max_tokens=4)
    bad.seed = 1.5  # type: ignore[assignment]
    with pytest.raises(ValueError, match="seed must be an integer"):
        llm.generate([[5, 6]], bad, use_tqdm=False)
    with pytest.raises(ValueError, match="the vocabulary has 512"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=2, logprobs=100_000), use_tqdm=False)
    late = SamplingParams(temperature=1.0, max_tokens=3, seed=1)
    late.top_k = -1  # vLLM's "disabled", set after construction
    assert len(llm.generate([[5, 6]], late, use_tqdm=False)[0].outputs[0].token_ids) == 3
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_vllm_constructor_spellings(llama_dir: Path) -> None:
    from quanta.engine.llm_engine import EngineArgs

    assert [EngineArgs(dtype=d).dtype for d in ("half", "float", "bf16", "auto")] == ["float16", "float32", "bfloat16", "auto"]
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        LLM(str(llama_dir), tensor_parallel_size=2)
    llm = LLM(
        str(llama_dir), seed=None, dtype="float", num_kv_blocks=64, max_model_len=128,  # seed None: a random one
        trust_remote_code=True, enforce_eager=True, tensor_parallel_size=1, tokenizer=str(llama_dir),
    )  # fmt: skip
    assert len(llm.generate([[5, 6]], SamplingParams(temperature=1.0, max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids) == 3


def _req(rid: str, output: list[int], **params) -> Request:
    r = Request(rid, [1, 2, 3], SamplingParams(**params), arrival_time=0.0, eos_token_ids=(0,))
    for t in output:
        r.append_output_token(t, 0.0)
    return r


def test_presence_and_frequency_penalties() -> None:
    sampler = Sampler(torch.device("cpu"))
    logits = torch.zeros(1, 8)
    logits[0, 5] = 1.0
    r = _req("a", [5, 5, 6], temperature=0.0, presence_penalty=0.5, frequency_penalty=0.4)
    processed = logits.clone()
    sampler._apply_penalties(processed, [r])
    # token 5: 1.0 - 0.4*2 - 0.5 = -0.3; token 6: -0.4 - 0.5 = -0.9
    assert processed[0, 5].item() == pytest.approx(-0.3)
    assert processed[0, 6].item() == pytest.approx(-0.9)
    assert processed[0, 7].item() == 0.0
    tokens, _ = sampler.sample(logits, [r])
    assert tokens == [0]  # token 0 is now the (first) maximum


def test_min_p_and_top_p_filter() -> None:
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for _ in range(50):
        t, _ = sampler.sample(logits, [_req("a", [], temperature=1.0, top_p=0.7)])
        assert t[0] in (0, 1)
        t, _ = sampler.sample(logits, [_req("b", [], temperature=1.0, min_p=0.5)])
        assert t[0] in (0, 1)


def test_sampling_follows_the_distribution() -> None:
    sampler = Sampler(torch.device("cpu"), seed=0)
    probs = torch.tensor([0.6, 0.3, 0.1])
    reqs = [_req(str(i), [], temperature=1.0) for i in range(4000)]
    tokens, _ = sampler.sample(torch.log(probs).repeat(4000, 1), reqs)
    freq = torch.bincount(torch.tensor(tokens), minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_detokenizer_primes_on_whole_characters_and_cuts_at_the_first_stop(llama_dir: Path) -> None:
    """The prompt's text never leaks into the output's (a prompt ending inside a character, or in a
    U+FFFD, once left the stream waiting and the first output chunk carried the prompt's tail); of two
    stop strings that one token completes, the text is cut at the one that starts first."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders
    from tokenizers.models import WordLevel

    from quanta.engine.output import IncrementalDetokenizer

    tok = FastTokenizer.from_file(str(llama_dir / "tokenizer.json"))  # byte-level BPE
    emoji = tok.encode(" emoji: \U0001f602\U0001f44d").ids
    prompt_len = len(tok.encode(" emoji: ").ids) + 1  # the prompt ends after the emoji's first byte token
    assert tok.decode(emoji[:prompt_len]).endswith("\ufffd")
    d = IncrementalDetokenizer(tok, emoji[:prompt_len], SamplingParams())
    for t in emoji[prompt_len:]:
        d.add(t)
    assert d.text == "\U0001f602\U0001f44d"  # the output completes the prompt's character, nothing more
    mojibake = tok.encode("Mojibake: caf\ufffd").ids
    d = IncrementalDetokenizer(tok, mojibake, SamplingParams())
    for t in tok.encode("\n\nnext").ids:
        d.add(t)
    assert "caf" not in d.text and d.text.endswith("\n\nnext")

    words = ["[UNK]", "The", " capital", " of", " France"]
    fused = FastTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    fused.decoder = decoders.Fuse()
    d = IncrementalDetokenizer(fused, [1], SamplingParams(stop=["ital", "cap"]))
    assert d.add(2) == "cap" and d.text == " "  # "ital" comes later in " capital": "cap" cuts first


def test_stop_token_text_and_a_stop_string_on_the_last_token(llm: LLM) -> None:
    base = llm.generate(
        PROMPTS[1:2], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    ids = base.token_ids
    # Stopped by a token: its text stays out (as in vLLM), unless asked for.
    words = [llm.get_tokenizer().decode([t]) for t in ids]  # a token that is a whole word of its own
    k = next(i for i in range(3, 30) if ids[i] not in ids[:i] and words[i].strip().isalnum() and words[i].isascii())
    upto = llm.generate(
        PROMPTS[1:2], SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    stopped = llm.generate(
        PROMPTS[1:2],
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[ids[k]], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert stopped.token_ids == ids[: k + 1] and stopped.text == upto.text
    kept = llm.generate(
        PROMPTS[1:2],
        SamplingParams(
            temperature=0.0, max_tokens=30, stop_token_ids=[ids[k]], include_stop_str_in_output=True, ignore_eos=True
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text.startswith(upto.text) and len(kept.text) > len(upto.text)
    # A stop string that the max_tokens-th token completes: the request stopped (vLLM's finish_reason).
    for m in range(4, 30):
        text = llm.generate(
            PROMPTS[1:2], SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True), use_tqdm=False
        )[0].outputs[0].text
        stop = text[-2:]
        if stop.strip() and len(stop) == 2 and text.find(stop) == len(text) - 2:
            break
    else:
        pytest.fail("no output whose last two characters appear only at its end")
    last = llm.generate(
        PROMPTS[1:2], SamplingParams(temperature=0.0, max_tokens=m, stop=[stop], ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert (last.text, last.finish_reason, last.stop_reason) == (text[:-2], "stop", stop)
