"""Model shape read from a Hugging Face `config.json`. Pure Python: the simulator's cost model uses it too."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


_ARCH_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


# The integer fields of ModelConfig that must be at least 1, and config.json's names of those it renames.
_COUNTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_position_embeddings",
)
HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_positive(label: str, value: object) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):  # type: ignore[arg-type]
        raise ValueError(f"{label} must be a positive number, got {value!r}")


# What the linear and llama3 rope tables read (yarn has its own check: its fields have defaults).
_ROPE_FIELDS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_kind(scaling: dict[str, Any] | None) -> str:
    """A rope_scaling's type: `rope_type`, which older files name `type`."""
    return scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"


def _check_yarn(scaling: dict[str, Any], label: str) -> None:
    """YaRN's fields, where transformers reads them: null is its default, and so is 0 for those it
    reads with `or` (the betas and mscales); anything else that would compute a wrong table is refused."""
    for f in ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim"):  # fmt: skip
        value = scaling.get(f)
        if value is None or (value == 0 and _is_number(value) and f.startswith(("beta", "mscale"))):
            continue
        _check_positive(f"{label}.{f}", value)
    if not isinstance(scaling.get("truncate", True), bool):
        raise ValueError(f"{label}.truncate must be true or false, got {scaling['truncate']!r}")


def _yarn_filled_in(scaling: dict[str, Any], cfg: dict[str, Any], context: int) -> dict[str, Any]:
    """The YaRN factor and original length as transformers derives them from config.json, fixed while
    `context` is still the file's max_position_embeddings (from_hf_dict then raises that)."""
    out = dict(scaling)
    # transformers lets a top-level original_max_position_embeddings (Phi-3's place) win, for any model.
    if "original_max_position_embeddings" in cfg:
        out["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    if out.get("original_max_position_embeddings") is None:
        out["original_max_position_embeddings"] = context
    old_len = out["original_max_position_embeddings"]
    if out.get("factor") is None and _is_number(old_len) and old_len > 0:
        out["factor"] = context / old_len  # DeepSeek-V3's convention: the ratio of the two lengths
    return out


class ModelLoadError(ValueError):
    """A model folder that cannot be served; the message is one line for the CLI."""


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's attention_bias puts a bias on o_proj too (Qwen2's q/k/v bias does not)
    mlp_bias: bool = False  # Llama's mlp_bias: gate, up and down projections
    # Set where the model's sliding window capped max_position_embeddings (quanta attends fully, which
    # equals sliding-window attention while the context fits in the window).
    sliding_window: int | None = None
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def check(self, names: dict[str, str] | None = None) -> None:
        """Raise ValueError naming the first field that no model can have: a count that is not a positive
        integer, heads that do not group, a non-positive norm epsilon or rope theta. Shapes read from a
        config.json or a profile are checked here, so a damaged file is an error on loading, not a
        division by zero (or a model run wrong) later. `names`: the file's own name of a field."""

        def name(f: str) -> str:
            return (names or {}).get(f, f)

        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; quanta supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for f in _COUNTS:
            value = getattr(self, f)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name(f)} must be a positive integer, got {value!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise ValueError(f"{name('sliding_window')} must be a positive integer, got {self.sliding_window!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{name('num_heads')} ({self.num_heads}) is not a multiple of "
                f"{name('num_kv_heads')} ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"{name('head_dim')} must be even (rotary embeddings turn pairs), got {self.head_dim}")
        for f in ("rms_norm_eps", "rope_theta"):
            _check_positive(name(f), getattr(self, f))
        for f in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{name(f)} must be true or false, got {getattr(self, f)!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"{name('rope_scaling')} must be an object or null, got {self.rope_scaling!r}")
        kind = rope_kind(self.rope_scaling)
        if kind == "yarn":
            assert self.rope_scaling is not None
            _check_yarn(self.rope_scaling, name("rope_scaling"))
        elif kind in _ROPE_FIELDS:  # each field the table needs, a positive number
            assert self.rope_scaling is not None
            for f in _ROPE_FIELDS[kind]:
                _check_positive(f"{name('rope_scaling')}.{f}", self.rope_scaling.get(f))
            if kind == "llama3" and not self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"]:
                raise ValueError(f"{name('rope_scaling')}.high_freq_factor must be above low_freq_factor")
        if not isinstance(self.dtype, str):
            raise ValueError(f"{name('dtype')} must be a string, got {self.dtype!r}")

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs and cfg.get("model_type") in _ARCH_OF_MODEL_TYPE:  # transformers loads such folders
            archs = [_ARCH_OF_MODEL_TYPE[cfg["model_type"]]]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or cfg.get('model_type')!r} in {source}; "
                f"quanta supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            # As transformers reads them: an absent (or null) count takes its default, a zero is an error.
            kv_heads = cfg.get("num_key_value_heads")
            kv_heads = heads if kv_heads is None else int(kv_heads)
            head_dim = cfg.get("head_dim")
            if head_dim is None:
                for name, value in (("hidden_size", hidden), ("num_attention_heads", heads)):
                    if value < 1:
                        raise ModelLoadError(f"malformed {source}: {name} must be a positive integer, got {value}")
                if hidden % heads:
                    raise ModelLoadError(
                        f"malformed {source}: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                        f"({heads}) and there is no head_dim"
                    )
                head_dim = hidden // heads
            sliding = (
                cfg.get("sliding_window")
                if cfg.get("use_sliding_window", arch != "Qwen2ForCausalLM")
                else None
            )
            eos = cfg.get("eos_token_id")
            rope_params = cfg.get("rope_parameters") or {}
            if not isinstance(rope_params, dict):
                raise ModelLoadError(f"malformed {source}: rope_parameters must be an object, got {rope_params!r}")
            rope_scaling = cfg.get("rope_scaling") or (
                rope_params if rope_kind(rope_params) != "default" else None
            )
            context = int(cfg.get("max_position_embeddings", 2048))
            if isinstance(rope_scaling, dict) and rope_kind(rope_scaling) == "yarn":
                rope_scaling = _yarn_filled_in(rope_scaling, cfg, context)
            out = cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=int(head_dim),
                max_position_embeddings=context,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                o_bias=arch == "LlamaForCausalLM" and bool(cfg.get("attention_bias", False)),
                mlp_bias=arch == "LlamaForCausalLM" and bool(cfg.get("mlp_bias", False)),
                dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            )
            sliding = None if sliding is None else int(sliding)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"malformed {source}: {type(e).__name__}: {e}") from None
        # What the forward pass does not implement is refused, not run wrong.
        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise ModelLoadError(f"unsupported hidden_act {act!r} in {source}; quanta's MLP is SiLU-gated")
        partial = cfg.get("partial_rotary_factor")
        if partial is not None and partial != 1:
            raise ModelLoadError(
                f"unsupported partial_rotary_factor {partial!r} in {source}: quanta rotates every head dimension"
            )
        quant = cfg.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise ModelLoadError(
                f"quantized checkpoint ({method}) in {source}: quanta loads unquantized weights (float32, "
                "float16, bfloat16) or a GGUF file"
            )
        if sliding is not None and sliding < 1:
            raise ModelLoadError(f"malformed {source}: sliding_window must be a positive integer, got {sliding}")
        try:
            # transformers 5 writes rope_parameters where older files have rope_scaling.
            out.check(HF_NAMES if cfg.get("rope_scaling") else {**HF_NAMES, "rope_scaling": "rope_parameters"})
        except ValueError as e:
            raise ModelLoadError(f"malformed {source}: {e}") from None
        if rope_kind(out.rope_scaling) == "yarn":
            # YaRN stretches the original context by its factor, and Qwen2.5's recipe leaves
            # max_position_embeddings at the original length: the stretched context is served, as vLLM does.
            assert out.rope_scaling is not None
            stretched = out.rope_scaling["factor"] * out.rope_scaling["original_max_position_embeddings"]
            out.max_position_embeddings = max(out.max_position_embeddings, int(stretched))
        # Full attention equals sliding-window attention while the context fits in the window,
        # so the window caps the usable context.
        if sliding is not None and sliding < out.max_position_embeddings:
            out.max_position_embeddings = out.sliding_window = sliding
        return out

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"model folder {str(path)!r} does not exist")
        if not path.is_dir():
            raise ModelLoadError(
                f"{str(path)!r} is neither a Hugging Face model folder nor a GGUF file"
            )
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{str(path)!r} has no config.json: not a Hugging Face model folder")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"malformed {cfg_path}: {e}") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"malformed {cfg_path}: expected a JSON object")
        out = cls.from_hf_dict(cfg, str(cfg_path))
        gen_path = path / "generation_config.json"
        if gen_path.is_file():
            try:
                eos = json.loads(gen_path.read_text()).get("eos_token_id")
            except (OSError, json.JSONDecodeError, AttributeError) as e:
                raise ModelLoadError(f"malformed {gen_path}: {e}") from None
            if eos is not None:
                out.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        return out

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        """A Hugging Face folder's config, or a GGUF file's (read from its metadata)."""
        from quanta.model.gguf_loader import config_from_gguf, is_gguf

        return config_from_gguf(path) if is_gguf(path) else cls.from_folder(path)

    @property
    def num_params(self) -> int:
        """Parameter count (weights only), for memory planning and the cost model."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        layer = attn + 3 * h * i + 2 * h
        return self.num_layers * layer + v * h * (1 if self.tie_word_embeddings else 2) + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
