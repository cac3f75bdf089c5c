"""The Triton attention backend, fused kernels and the decode-graph path through the whole model, against
`transformers` (natively on CUDA; on CPU in Triton's interpreter, set up in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import hf_model
from quanta import LLM, SamplingParams
from test_model_vs_hf import assert_pool_clean, hf_greedy, quanta_greedy, workload

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def small_workload() -> tuple[list[list[int]], list[int]]:
    """Few, short prompts: Triton's interpreter runs each kernel program in Python."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 9, 23, 40, 70)]
    return prompts, [4, 6, 3, 8, 5]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "decode-graphs"])
def test_greedy_equals_transformers(model_dir: Path, graphs: bool) -> None:
    prompts, max_tokens = workload() if DEVICE == "cuda" else small_workload()
    llm = LLM(
        str(model_dir),
        device=DEVICE,
        dtype="float32",
        attention_backend="triton",
        cuda_graphs=graphs,  # on CPU: the padded static-buffer path, run eagerly
        max_num_batched_tokens=32,  # chunked prefill: chunks with cached context
        num_kv_blocks=400,
        max_model_len=512,
        max_num_seqs=3,  # decode buckets 1, 2, 3: padding is exercised
        check_integrity=True,
    )
    got = quanta_greedy(llm, prompts, max_tokens)
    assert got == hf_greedy(model_dir, prompts, max_tokens, seed=0 if DEVICE == "cuda" else 11)
    assert_pool_clean(llm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 comparison runs on the GPU")
def test_bfloat16_first_step_logits_match_transformers(llama_dir: Path) -> None:
    prompts, _ = workload(seed=3)
    model = hf_model(llama_dir)
    hf = type(model).from_pretrained(llama_dir, dtype=torch.bfloat16).to("cuda").eval()
    llm = LLM(str(llama_dir), device="cuda", dtype="bfloat16", num_kv_blocks=400, max_model_len=512)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float(), -1)
        entry = out.outputs[0].logprobs[0]
        for token, lp in entry.items():
            assert abs(lp.logprob - ref[token].item()) < 0.05, (token, lp.logprob, ref[token].item())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(device="cuda:7"), "cuda:7"),
        (dict(attention_backend="flash"), "unknown attention backend"),
        (dict(load_format="pickle"), "unknown load format"),
    ],
)
def test_bad_engine_arguments_are_one_line_errors(llama_dir: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(str(llama_dir), **kwargs)


def test_triton_backend_needs_cuda_or_the_interpreter(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        LLM(str(llama_dir), device="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLM(str(llama_dir), attention_backend="triton")


def test_dummy_load_format_needs_no_weights(llama_dir: Path, tmp_path: Path) -> None:
    """--load-format dummy: random weights from the config alone (benchmarks of large shapes)."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((llama_dir / name).read_bytes())
    llm = LLM(str(folder), load_format="dummy", num_kv_blocks=64, max_model_len=256)
    out = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(folder), num_kv_blocks=64, max_model_len=256)
