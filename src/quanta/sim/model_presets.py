"""Named model shapes (from the models' Hugging Face config.json files), for simulating without a download."""

from __future__ import annotations

from pathlib import Path

from quanta.model.config import ModelConfig


def _llama(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, ctx: int, **kw
) -> ModelConfig:
    return ModelConfig(
        architecture=kw.pop("architecture", "LlamaForCausalLM"),
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        max_position_embeddings=ctx,
        dtype="bfloat16",
        **kw,
    )


MODEL_PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8, 32000, 4096),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128256, 131072, rope_theta=500000.0),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, 128256, 131072, rope_theta=500000.0),
    "mistral-7b": _llama(4096, 14336, 32, 32, 8, 32000, 32768, architecture="MistralForCausalLM"),
    "qwen2.5-7b": _llama(
        3584, 18944, 28, 28, 4, 152064, 32768, architecture="Qwen2ForCausalLM", qkv_bias=True
    ),
    "yi-34b": _llama(7168, 20480, 60, 56, 8, 64000, 4096),
}


def get_model(name_or_path: str) -> ModelConfig:
    """A preset name, or a Hugging Face model folder / config.json path (only the shape is read)."""
    key = name_or_path.lower()
    if key in MODEL_PRESETS:
        return MODEL_PRESETS[key]
    path = Path(name_or_path)
    if path.name == "config.json":
        path = path.parent
    if path.is_dir() or path.is_file():
        return ModelConfig.from_path(path)
    raise ValueError(
        f"unknown model {name_or_path!r}: give a Hugging Face model folder, a GGUF file or one of {', '.join(MODEL_PRESETS)}"
    )
