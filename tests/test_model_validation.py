"""Model shapes are validated where they are read (config.json, a profile's `model` block), and a folder
re-made by make-model with and without sharding stays loadable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from quanta import LLM, SamplingParams
from quanta.model.config import ModelConfig, ModelLoadError
from quanta.model.loader import weight_files
from quanta.sim.calibrate import Profile
from test_cost_model import GPU, MODEL

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def write_config(folder: Path, **change: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**HF_CONFIG, **change}
    for key in [k for k, v in change.items() if v is None]:
        del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_attention_heads": 0, "head_dim": 16}, "num_attention_heads must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
        ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer, got -1"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
        ({"num_key_value_heads": 3}, "num_attention_heads .4. is not a multiple of num_key_value_heads .3."),
        ({"num_attention_heads": 3, "num_key_value_heads": 1}, "hidden_size .64. is not a multiple of"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"intermediate_size": -128}, "intermediate_size must be a positive integer, got -128"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
        ({"head_dim": 0}, "head_dim must be a positive integer, got 0"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer, got 0"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a positive number"),
        ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling\.factor must be a positive number, got None"),
        ({"rope_scaling": {"type": "linear", "factor": "2"}}, r"rope_scaling\.factor must be a positive number"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
            r"rope_scaling\.original_max_position_embeddings must be a positive number, got None",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            "high_freq_factor must be above low_freq_factor",
        ),
        ({"rope_parameters": {"rope_type": "linear", "factor": -1}}, r"rope_parameters\.factor must be a positive"),
        ({"rope_parameters": [1, 2]}, "rope_parameters must be an object"),
    ],
)
def test_config_json_with_impossible_shapes_is_refused(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match) as info:
        ModelConfig.from_folder(write_config(tmp_path / "m", **change))
    assert "\n" not in str(info.value) and "malformed" in str(info.value)


def test_rope_that_the_forward_pass_does_not_do_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"unsupported partial_rotary_factor 0\.5 .* every head dimension"):
        ModelConfig.from_folder(write_config(tmp_path / "partial", partial_rotary_factor=0.5))
    whole = ModelConfig.from_folder(write_config(tmp_path / "whole", partial_rotary_factor=1.0))
    assert whole.head_dim == 16


def test_config_json_shapes_that_transformers_accepts_still_load(tmp_path: Path) -> None:
    # No num_key_value_heads: multi-head attention, as transformers reads it.
    mha = ModelConfig.from_folder(write_config(tmp_path / "mha", num_key_value_heads=None))
    assert mha.num_kv_heads == 4 and mha.head_dim == 16
    # An explicit head_dim need not divide the hidden size (q_proj maps hidden to heads * head_dim).
    wide = ModelConfig.from_folder(write_config(tmp_path / "wide", num_attention_heads=3, num_key_value_heads=1,
                                                head_dim=32))  # fmt: skip
    assert (wide.num_heads, wide.head_dim) == (3, 32)
    # A null head_dim is computed, as transformers does.
    assert ModelConfig.from_folder(write_config(tmp_path / "null", head_dim=None)).head_dim == 16


@pytest.mark.parametrize(
    ("command", "field"),
    [("generate", "num_attention_heads"), ("simulate", "num_hidden_layers")],
)
def test_cli_refuses_zero_counts_in_one_line(tmp_path: Path, command: str, field: str) -> None:
    folder = write_config(tmp_path / "m", **{field: 0})
    if command == "generate":
        args = ["generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "2"]
    else:
        args = ["simulate", "--model", str(folder), "--qps", "1", "--num-requests", "3"]
    out = run_cli(*args, env_cache=tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert f"{field} must be a positive integer" in out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr


def _profile_with_model(tmp_path: Path, **change: object) -> Path:
    points = [{"batch": [[0, n]], "num_sampled": 1, "seconds": 1e-3 * n} for n in (8, 16, 32, 64)]
    Profile("toy", GPU.bf16_flops, GPU.mem_bandwidth, GPU.mem_bytes, 2, MODEL, points).save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    data["model"].update(change)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    return tmp_path / "bad.json"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_layers": 0}, "num_layers must be a positive integer, got 0"),
        ({"num_layers": "x"}, "num_layers must be a positive integer, got 'x'"),
        ({"num_layers": 2.5}, "num_layers must be a positive integer, got 2.5"),
        ({"num_layers": True}, "num_layers must be a positive integer, got True"),
        ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
        ({"num_kv_heads": 0}, "num_kv_heads must be a positive integer, got 0"),
        ({"num_kv_heads": 3}, r"num_heads \(8\) is not a multiple of num_kv_heads \(3\)"),
        ({"head_dim": -128}, "head_dim must be a positive integer"),
        ({"vocab_size": None}, "vocab_size must be a positive integer, got None"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
        ({"architecture": "GPT2LMHeadModel"}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"rope_theta": "x"}, "rope_theta must be a positive number"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ],
)
def test_profile_model_block_is_validated(tmp_path: Path, change: dict, match: str) -> None:
    bad = _profile_with_model(tmp_path, **change)
    assert Profile.load(tmp_path / "p.json").model == MODEL  # the undamaged file loads
    with pytest.raises(ValueError, match=match) as info:
        Profile.load(bad)
    assert str(info.value).startswith(f"cannot read profile {str(bad)!r}: model: ")


def test_simulate_with_a_damaged_profile_model_is_one_line(tmp_path: Path) -> None:
    bad = _profile_with_model(tmp_path, num_layers=0)
    out = run_cli("simulate", "--profile", str(bad), "--qps", "2", "--num-requests", "5", env_cache=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "cannot read profile" in out.stderr and "num_layers must be a positive integer" in out.stderr


# ---- sharded, then single-file (and back) in one folder --------------------------------------------


def test_make_model_single_after_sharded_removes_the_stale_index(tmp_path: Path) -> None:
    from quanta.model.make_model import make_model

    out = tmp_path / "m"
    make_model(out, "tiny-llama", seed=1, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    make_model(out, "tiny-llama", seed=5)
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert weight_files(out) == [out / "model.safetensors"]
    # And back: sharded over single leaves no stale model.safetensors (which transformers would prefer).
    make_model(out, "tiny-llama", seed=6, max_shard_size="100KB")
    assert not (out / "model.safetensors").exists()
    files = weight_files(out)
    assert len(files) > 1 and all(f.is_file() for f in files)
    # A save that fails puts the earlier weights back.
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError):
        make_model(out, "tiny-llama", seed=7, max_shard_size="100")
    assert sorted(p.name for p in out.iterdir()) == before and weight_files(out) == files


def test_loader_prefers_model_safetensors_over_a_stale_index(llama_dir: Path, tmp_path: Path) -> None:
    """As transformers' from_pretrained does: model.safetensors wins over model.safetensors.index.json."""
    path = tmp_path / "m"
    shutil.copytree(llama_dir, path)
    stale = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00016.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(stale))
    assert weight_files(path) == [path / "model.safetensors"]
    llm = LLM(str(path), num_kv_blocks=64, max_model_len=256)
    out = llm.generate(["hello"], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_cli_make_model_rerun_then_generate(tmp_path: Path) -> None:
    """The report's exact sequence."""
    folder = str(tmp_path / "x5")
    assert run_cli("make-model", folder, "--max-shard-size", "10KB", env_cache=tmp_path).returncode == 0
    assert run_cli("make-model", folder, "--seed", "5", env_cache=tmp_path).returncode == 0
    out = run_cli("generate", "--model", folder, "--prompt", "hi", "--max-tokens", "2", env_cache=tmp_path)
    assert out.returncode == 0, out.stderr
