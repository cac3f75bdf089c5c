"""The torch model path against Hugging Face transformers on the same random-weight models (CPU, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import hf_model
from quanta import LLM, SamplingParams

NUM_PROMPTS = 16


def workload(seed: int = 0, vocab: int = 512) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 300] + torch.randint(2, 300, (NUM_PROMPTS - 2,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    max_tokens = torch.randint(1, 24, (NUM_PROMPTS,), generator=g).tolist()
    return prompts, max_tokens


_REFERENCE: dict[tuple[Path, int], list[list[int]]] = {}


def hf_greedy(path: Path, prompts: list[list[int]], max_tokens: list[int], seed: int = 0) -> list[list[int]]:
    key = (path, seed)
    if key not in _REFERENCE:
        model = hf_model(path)
        outs = []
        with torch.no_grad():
            for p, m in zip(prompts, max_tokens):
                ids = model.generate(torch.tensor([p]), max_new_tokens=m, do_sample=False, min_new_tokens=0)
                outs.append(ids[0, len(p) :].tolist())
        _REFERENCE[key] = outs
    return _REFERENCE[key]


def quanta_greedy(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_pool_clean(llm: LLM) -> None:
    kv = llm.engine.core.kv
    kv.check_integrity()
    assert not kv.req_blocks
    assert kv.num_free_blocks == kv.num_blocks  # every block is free (possibly still cached)


@pytest.mark.parametrize(
    "budget,num_blocks,caching,kernels",
    [(7, 400, False, True), (64, 400, True, True), (64, 400, True, False), (512, 40, False, True)],
    ids=["budget7", "budget64", "budget64-portable-attention", "small-pool"],
)
def test_greedy_equals_transformers(
    model_dir: Path, budget: int, num_blocks: int, caching: bool, kernels: bool
) -> None:
    prompts, max_tokens = workload()
    llm = LLM(
        str(model_dir),
        max_num_batched_tokens=budget,
        num_kv_blocks=num_blocks,
        max_model_len=512,
        enable_prefix_caching=caching,
        cpu_kernels=kernels,
        check_integrity=True,
    )
    got = quanta_greedy(llm, prompts, max_tokens)
    assert got == hf_greedy(model_dir, prompts, max_tokens)
    if num_blocks == 40:
        assert llm.engine.core.scheduler.num_preemptions > 0, "the small pool should force preemption"
    assert_pool_clean(llm)


def test_prefix_cache_hits_give_the_same_outputs(model_dir: Path) -> None:
    g = torch.Generator().manual_seed(5)
    system = torch.randint(3, 512, (100,), generator=g).tolist()
    prompts = [system + torch.randint(3, 512, (int(n),), generator=g).tolist() for n in range(1, 33, 2)]
    max_tokens = [8 + i % 5 for i in range(len(prompts))]
    cached = LLM(
        str(model_dir), max_num_batched_tokens=64, num_kv_blocks=400, max_model_len=512, check_integrity=True
    )
    plain = LLM(
        str(model_dir),
        max_num_batched_tokens=64,
        num_kv_blocks=400,
        max_model_len=512,
        enable_prefix_caching=False,
    )
    got = quanta_greedy(cached, prompts, max_tokens)
    assert cached.engine.core.kv.pool.num_cache_hits > 0
    assert got == quanta_greedy(plain, prompts, max_tokens)
    assert got == hf_greedy(model_dir, prompts, max_tokens, seed=5)
    assert_pool_clean(cached)


def test_logprobs_match_transformers(model_dir: Path) -> None:
    prompts, _ = workload(seed=3)
    prompts = prompts[:6]
    llm = LLM(str(model_dir), max_num_batched_tokens=32, num_kv_blocks=400, max_model_len=512)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=6, logprobs=3, prompt_logprobs=2)
    model = hf_model(model_dir)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        sample = out.outputs[0]
        ids = torch.tensor([prompt + sample.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        n = len(prompt)
        for j, (tok, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
            row = ref[n - 1 + j]
            assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
            assert entry[tok].rank == int((row > row[tok]).sum()) + 1
            top = row.topk(3)
            for t, lp in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[t].logprob == pytest.approx(lp, abs=1e-4)
        assert out.prompt_logprobs[0] is None
        for p in range(1, n):
            assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(
                ref[p - 1, prompt[p]].item(), abs=1e-4
            )
        assert sample.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(sample.token_ids, sample.logprobs))
        )


def test_repetition_penalty_matches_transformers(llama_dir: Path) -> None:
    prompts, _ = workload(seed=4)
    prompts = prompts[:4]
    llm = LLM(str(llama_dir), num_kv_blocks=400, max_model_len=512)
    outs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.5), use_tqdm=False
    )
    model = hf_model(llama_dir)
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5)
        assert o.outputs[0].token_ids == ref[0, len(p) :].tolist()


def test_bfloat16_matches_transformers_in_bfloat16(sharp_llama_dir: Path) -> None:
    """bfloat16 on the CPU against `transformers` in bfloat16, on a model sensitive to rope and weights.

    Greedy tokens can differ from transformers' only where its top two logits are within bfloat16
    rounding, so each of quanta's tokens is checked teacher-forced: it must be transformers' argmax or
    within `near` of it. Logprobs (the top 5 of every step, and the prompt's) must agree within bfloat16
    rounding (max 0.1, mean 0.02; float32 vs bfloat16 transformers differ by ~0.03 max, ~0.008 mean),
    while a wrong rotary embedding (sign, layout, positions rounded to bfloat16 past 256) or a mangled
    weight moves them by 0.3 to 3."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 7, 30, 77, 150, 290)]
    llm = LLM(
        str(sharp_llama_dir), dtype="bfloat16", num_kv_blocks=200, max_model_len=512, max_num_batched_tokens=128
    )
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(sharp_llama_dir, dtype=torch.bfloat16).eval()
    near, errors, argmax_hits, steps = 0.1, [], 0, 0
    for prompt, out in zip(prompts, outs):
        sample = out.outputs[0]
        assert len(sample.token_ids) == 12
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt + sample.token_ids])).logits[0].float(), dim=-1)
        n = len(prompt)
        for j, (tok, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
            row = ref[n - 1 + j]
            assert row.max().item() - row[tok].item() <= near, (n, j, tok, row.argmax().item())
            argmax_hits += int(row.argmax().item() == tok)
            steps += 1
            errors += [abs(lp.logprob - row[t].item()) for t, lp in entry.items()]
        errors += [abs(out.prompt_logprobs[p][prompt[p]].logprob - ref[p - 1, prompt[p]].item()) for p in range(1, n)]
    assert argmax_hits >= 0.9 * steps, (argmax_hits, steps)
    assert max(errors) < 0.1, max(errors)
    assert sum(errors) / len(errors) < 0.02, sum(errors) / len(errors)


def test_llama_with_attention_and_mlp_biases_matches_transformers(tmp_path: Path) -> None:
    """Llama's attention_bias puts a bias on q, k, v and o; mlp_bias on gate, up and down (transformers
    starts them at zero: random here, or a model that ignores them would pass)."""
    from safetensors.torch import load_file, save_file

    from quanta.model.make_model import make_model

    path = make_model(tmp_path / "m", "tiny-llama", seed=3, attention_bias=True, mlp_bias=True)
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    biases = [k for k in tensors if k.endswith(".bias")]
    assert {k.rsplit(".", 2)[-2] for k in biases} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for k in biases:
        tensors[k] = 0.5 * torch.randn(tensors[k].shape, generator=g)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    prompts, max_tokens = workload(seed=3)
    prompts, max_tokens = prompts[:6], max_tokens[:6]
    llm = LLM(str(path), max_num_batched_tokens=64, num_kv_blocks=200, max_model_len=512, check_integrity=True)
    assert quanta_greedy(llm, prompts, max_tokens) == hf_greedy(path, prompts, max_tokens)
