"""Shared fixtures: random-weight model folders made by quanta's own make-model (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU); it must be chosen before
# any kernel is defined, so before quanta.model.triton_* is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
