"""YaRN rope scaling (`rope_scaling: {"type": "yarn", ...}`, as Qwen2.5's docs add for long contexts)
against Hugging Face transformers: the cos/sin tables bit for bit, greedy tokens past the original
context, the fields' validation, and llama.cpp's YaRN metadata in a GGUF file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import gguf_writer
from conftest import hf_model
from quanta import LLM, SamplingParams
from quanta.model.config import ModelConfig, ModelLoadError
from quanta.model.llama import RotaryEmbedding, rope_inv_freq
from test_model_validation import HF_CONFIG

# test_model_validation's tiny Llama config, without its architecture (each case names its own).
BASE = {k: v for k, v in HF_CONFIG.items() if k not in ("architectures", "model_type")}
ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_tables(cfg: dict, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos and sin (its attention factor applied) for a config.json dict, in float32."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    rotary_class = LlamaRotaryEmbedding if cfg["model_type"] == "llama" else Qwen2RotaryEmbedding
    rotary = rotary_class(AutoConfig.for_model(**cfg))
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(x, positions[None])
    return cos[0], sin[0]


def _yarn(**fields: object) -> dict:
    return {"rope_type": "yarn", **fields}


# config.json fields beside BASE, by case.
TABLE_CASES: dict[str, dict] = {
    "basic": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}},
    # Qwen2.5's recipe: the original length is max_position_embeddings itself.
    "qwen2.5": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
    "no-original": {"rope_scaling": _yarn(factor=8)},  # the original length defaults to the context
    "no-factor": {"rope_scaling": _yarn(factor=None, original_max_position_embeddings=128)},  # their ratio
    "mscale": {
        "rope_scaling": _yarn(
            factor=4.0, original_max_position_embeddings=256, mscale=1.0, mscale_all_dim=0.707
        )
    },
    "attention-factor": {
        "rope_scaling": _yarn(
            factor=16.0, original_max_position_embeddings=64, attention_factor=0.8, beta_fast=16, beta_slow=2
        )
    },
    "no-truncate": {
        "rope_scaling": _yarn(factor=4.0, original_max_position_embeddings=256, truncate=False),
        "rope_theta": 1000000.0,
        "head_dim": 32,
    },
    # A top-level original_max_position_embeddings wins over the one inside, in transformers.
    "top-level-original": {
        "rope_scaling": _yarn(factor=4.0, original_max_position_embeddings=128),
        "original_max_position_embeddings": 512,
    },
    # transformers 5's own spelling, rope_theta inside.
    "rope-parameters": {
        "rope_parameters": _yarn(factor=2.0, original_max_position_embeddings=512, rope_theta=500000.0)
    },
}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("extra", list(TABLE_CASES.values()), ids=list(TABLE_CASES))
def test_rope_tables_equal_transformers(model_type: str, extra: dict) -> None:
    cfg = {"architectures": [ARCH[model_type]], "model_type": model_type, **BASE, **extra}
    ours = ModelConfig.from_hf_dict(json.loads(json.dumps(cfg)))
    positions = torch.arange(0, 4096, 7)
    rotary = RotaryEmbedding(ours, 4096)
    cos, sin = hf_tables(cfg, positions)
    assert torch.equal(rotary.cos[positions], cos)
    assert torch.equal(rotary.sin[positions], sin)
    # Scaled: not the default table.
    plain = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_parameters")}
    assert not torch.equal(rope_inv_freq(ours), rope_inv_freq(ModelConfig.from_hf_dict(plain)))


def test_context_is_stretched_by_the_factor() -> None:
    """Qwen2.5's recipe keeps max_position_embeddings at the original 32768 and asks for factor 4."""
    cfg = {"architectures": ["Qwen2ForCausalLM"], **BASE, "max_position_embeddings": 32768}
    scaled = {
        **cfg,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    assert ModelConfig.from_hf_dict(scaled).max_position_embeddings == 131072
    # Never below the file's own context.
    short = {**cfg, "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}}
    assert ModelConfig.from_hf_dict(short).max_position_embeddings == 32768


# ---- greedy decoding against transformers -------------------------------------------------------------


# Weight multipliers by projection: sharp, position-dependent attention whose output outweighs the
# residual stream. At the random init (std 0.02) attention is near uniform and the tied qwen2 model just
# repeats its last token, so a wrong rope table (or attention factor) would flip no greedy token.
SHARPEN = {"q_proj": 8.0, "k_proj": 8.0, "v_proj": 4.0, "o_proj": 4.0}


def yarn_folder(src: Path, out: Path, rope_scaling: dict, **change: object) -> Path:
    """`src` sharpened (SHARPEN) with a YaRN rope_scaling and `change` in its config.json."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        for name, tensor in tensors.items():
            module = name.split(".")[-2]
            tensor *= SHARPEN.get(module, 1.0)
        save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(rope_scaling=rope_scaling, **change)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def yarn_llama_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    return yarn_folder(llama_dir, tmp_path_factory.mktemp("yarn") / "llama", scaling)


@pytest.fixture(scope="module")
def yarn_qwen2_dir(qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Qwen2.5's recipe in small: the original length is the file's max_position_embeddings, and the prompts
    # run past it into the context the factor stretches.
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    return yarn_folder(
        qwen2_dir, tmp_path_factory.mktemp("yarn") / "qwen2", scaling, max_position_embeddings=256
    )


def greedy_pair(path: Path, lengths: list[int], max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """quanta's greedy tokens and transformers' (float32, on random prompts of these lengths)."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    llm = LLM(str(path), max_num_batched_tokens=64, num_kv_blocks=200, max_model_len=512)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    # transformers' argmax by hand: its generate() would hold eos back for min_new_tokens, which
    # ignore_eos does not.
    model, ref = hf_model(path), []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(max_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            ref.append(ids[len(p) :])
    return ours, ref


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_transformers(arch: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(f"yarn_{arch}_dir")
    # qwen2: 256 in the file, stretched 4x; the prompts past 256 would be refused without the stretch.
    assert ModelConfig.from_folder(path).max_position_embeddings == 1024
    ours, ref = greedy_pair(path, [5, 100, 200, 300, 420], 12)
    assert ours == ref


# ---- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scaling", "match"),
    [
        ({"factor": 0}, "rope_scaling.factor must be a positive number, got 0"),
        ({"factor": -2.0}, "rope_scaling.factor must be a positive number, got -2.0"),
        ({"factor": "4"}, "rope_scaling.factor must be a positive number, got '4'"),
        ({"factor": True}, "rope_scaling.factor must be a positive number, got True"),
        (
            {"factor": 4, "original_max_position_embeddings": 0},
            "rope_scaling.original_max_position_embeddings must be a positive number, got 0",
        ),
        ({"factor": 4, "attention_factor": -1.0}, "rope_scaling.attention_factor must be a positive number"),
        ({"factor": 4, "beta_fast": "x"}, "rope_scaling.beta_fast must be a positive number, got 'x'"),
        ({"factor": 4, "beta_slow": -1}, "rope_scaling.beta_slow must be a positive number, got -1"),
        ({"factor": 4, "mscale": -1, "mscale_all_dim": 1}, "rope_scaling.mscale must be a positive number"),
        ({"factor": 4, "truncate": "no"}, "rope_scaling.truncate must be true or false, got 'no'"),
    ],
)
def test_bad_yarn_fields_are_one_line_errors(tmp_path: Path, scaling: dict, match: str) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], **BASE, "rope_scaling": {"type": "yarn", **scaling}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=match) as info:
        ModelConfig.from_folder(tmp_path)
    assert "\n" not in str(info.value) and str(info.value).startswith("malformed ")
    # transformers 5's spelling is named as the file names it.
    (tmp_path / "config.json").write_text(
        json.dumps({**cfg, "rope_scaling": None, "rope_parameters": cfg["rope_scaling"]})
    )
    with pytest.raises(ModelLoadError, match=match.replace("rope_scaling", "rope_parameters")):
        ModelConfig.from_folder(tmp_path)


def test_dynamic_rope_scaling_is_still_refused() -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], **BASE, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.raises(ModelLoadError, match="unsupported rope_scaling type 'dynamic'"):
        rope_inv_freq(ModelConfig.from_hf_dict(cfg))


# ---- GGUF ------------------------------------------------------------------------------------------------


def yarn_gguf(folder: Path, out: Path, monkeypatch: pytest.MonkeyPatch, **keys: float) -> Path:
    """`folder` as a GGUF file with the YaRN metadata llama.cpp's converter writes for its rope_scaling."""
    import gguf

    scaling = json.loads((folder / "config.json").read_text())["rope_scaling"]

    class Writer(gguf.GGUFWriter):
        def __init__(self, path: str, arch: str) -> None:
            super().__init__(path, arch)
            self.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            self.add_rope_scaling_factor(scaling["factor"])
            self.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
            for key, value in keys.items():
                getattr(self, f"add_rope_scaling_{key}")(value)

    monkeypatch.setattr(gguf_writer, "GGUFWriter", Writer)
    return gguf_writer.write_gguf(folder, out)


def test_yarn_gguf_runs_as_its_folder(
    yarn_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = yarn_gguf(
        yarn_llama_dir, tmp_path / "yarn.gguf", monkeypatch, yarn_beta_fast=32.0, yarn_beta_slow=1.0
    )
    cfg, ref = ModelConfig.from_path(path), ModelConfig.from_folder(yarn_llama_dir)
    assert ref.rope_scaling is not None and cfg.rope_scaling == {
        **ref.rope_scaling,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    assert cfg.max_position_embeddings == ref.max_position_embeddings
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (150, 300)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = [
        [
            o.outputs[0].token_ids
            for o in LLM(str(p), dtype="float32", num_kv_blocks=100).generate(prompts, params, use_tqdm=False)
        ]
        for p in (path, yarn_llama_dir)
    ]
    assert outs[0] == outs[1]
    # An attention factor in the file is transformers' attention_factor.
    path = yarn_gguf(yarn_llama_dir, tmp_path / "af.gguf", monkeypatch, yarn_attn_factor=0.5)
    assert ModelConfig.from_path(path).rope_scaling["attention_factor"] == 0.5


def test_gguf_yarn_log_multiplier_is_refused(
    yarn_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = yarn_gguf(yarn_llama_dir, tmp_path / "log.gguf", monkeypatch, yarn_log_mul=0.1)
    with pytest.raises(ModelLoadError, match="yarn_log_multiplier") as info:
        ModelConfig.from_path(path)
    assert "\n" not in str(info.value)
