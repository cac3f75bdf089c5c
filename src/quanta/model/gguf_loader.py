"""GGUF model files: read with the `gguf` package, dequantized once into a cached Hugging Face folder.

`LLM(model="model.gguf")` and `--model model.gguf` go through `model_folder`: the first start reads the
GGUF (config and tokenizer from its metadata, tensors dequantized with `gguf.quants`), undoes llama.cpp's
Q/K row permutation and writes config.json, tokenizer files and safetensors under the cache directory.
Later starts find that folder by the file's path, size and modification time without parsing the GGUF,
so they are as fast as an HF folder. Pure numpy here: the folder is then loaded like any other.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from quanta.model.config import ModelLoadError
from quanta.model.default_model import cache_dir

# Bumped when the folder layout or the conversion changes, so old caches are not reused.
CONVERTER_VERSION = 3  # 3: eot/eom ids among the eos ids
GGUF_MAGIC = b"GGUF"
# llama.cpp architecture name -> (HF architecture, model_type, Q/K rows permuted by llama.cpp's converter)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# dtype "auto" for a GGUF file: the weights were quantized, and bfloat16 keeps their range at half of
# float32's memory (and is the fast path on CPU and GPU).
GGUF_DTYPE = "bfloat16"


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _fingerprint(path: Path, span: int = 1 << 20) -> str:
    """The file's first and last MiB, hashed: another file copied over it with the same size and time
    (cp -p, rsync -t, an unpacked archive) differs there (metadata, last tensors)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(span))
        size = f.seek(0, 2)
        f.seek(max(size - span, 0))
        h.update(f.read(span))
    return h.hexdigest()[:16]


def _cache_dir(path: Path, dtype: str) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_fingerprint(path)}|{CONVERTER_VERSION}|{dtype}"
    return cache_dir() / "gguf" / f"{path.stem}-{dtype}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _reader(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # a truncated or corrupt file raises anything (IndexError, struct.error, ...)
        raise ModelLoadError(f"cannot read GGUF file {str(path)!r} (truncated or corrupt?): {e!r}") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config(reader: Any, source: str) -> dict[str, Any]:
    """The Hugging Face config.json equivalent of a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r} in {source}; quanta reads {', '.join(ARCHITECTURES)}"
        )
    hf_arch, model_type, _ = ARCHITECTURES[arch]

    def meta(name: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"GGUF file {source} lacks metadata {arch}.{name}")
        return value

    tensors = {t.name for t in reader.tensors}
    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    # Checked before the weights are converted (the other counts are checked with the config this builds).
    for name, value in (("attention.head_count", heads), ("block_count", int(meta("block_count")))):
        if value < 1:
            raise ModelLoadError(f"GGUF file {source}: {arch}.{name} must be at least 1, got {value}")
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(meta("context_length")),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "torch_dtype": GGUF_DTYPE,
    }
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        cfg["bos_token_id"] = int(bos)
    # llama.cpp ends a turn at eos, end-of-turn and end-of-message alike (Llama 3 Instruct: <|eot_id|>).
    stops = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(int(s) for s in stops if s is not None))
    if stops:
        cfg["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(factor or 1.0)}
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if original:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(original)
        if scaling == "yarn":
            cfg["rope_scaling"].update(_yarn_fields(reader, arch, source))
    if "rope_freqs.weight" in tensors:
        cfg["rope_scaling"] = _llama3_rope_scaling(reader, cfg, source)
    return cfg


def _yarn_fields(reader: Any, arch: str, source: str) -> dict[str, Any]:
    """The optional YaRN fields llama.cpp's converter copies from a transformers config, under its names.
    (Its yarn_ext_factor is the config's extrapolation_factor, which transformers does not read.)"""
    out = {}
    for key, hf_name in (
        ("yarn_attn_factor", "attention_factor"),
        ("yarn_beta_fast", "beta_fast"),
        ("yarn_beta_slow", "beta_slow"),
    ):
        value = _field(reader, f"{arch}.rope.scaling.{key}")
        if value is not None:
            out[hf_name] = float(value)
    # DeepSeek's mscale_all_dim, which scales its attention's softmax; transformers' Llama and Qwen2
    # have no such field, so a file carrying one was made for another attention than quanta's.
    if _field(reader, f"{arch}.rope.scaling.yarn_log_multiplier"):
        raise ModelLoadError(
            f"GGUF file {source} has {arch}.rope.scaling.yarn_log_multiplier, which quanta's {arch} does not apply"
        )
    return out


def _llama3_rope_scaling(reader: Any, cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Llama 3.x stores its rotary frequency divisors as a tensor: recover the HF `llama3` parameters
    (the largest divisor is the factor; Meta's low/high factors and 8192 original length) and check
    that they reproduce the tensor exactly, or refuse."""
    import numpy as np

    from quanta.model.config import ModelConfig
    from quanta.model.llama import rope_inv_freq

    divisors = next(np.asarray(t.data, dtype=np.float64) for t in reader.tensors if t.name == "rope_freqs.weight")
    guess = {
        "rope_type": "llama3",
        "factor": float(divisors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    plain = ModelConfig.from_hf_dict(cfg, source)
    scaled = ModelConfig.from_hf_dict({**cfg, "rope_scaling": guess}, source)
    implied = (rope_inv_freq(plain) / rope_inv_freq(scaled)).double().numpy()
    if implied.shape != divisors.shape or not np.allclose(implied, divisors, rtol=1e-4):
        raise ModelLoadError(f"GGUF file {source} has rope frequency factors quanta cannot map to a rope type")
    return guess


def config_from_gguf(path: str | Path) -> Any:
    """The ModelConfig of a GGUF file (its cached folder's, when converted already)."""
    from quanta.model.config import ModelConfig

    path = Path(path)
    for dtype in STORAGE_DTYPES:
        folder = _cache_dir(path, dtype)
        if (folder / "config.json").is_file():
            cfg = ModelConfig.from_folder(folder)
            cfg.dtype = GGUF_DTYPE  # the folder's own dtype is its storage dtype, not the file's default
            return cfg
    return ModelConfig.from_hf_dict(hf_config(_reader(path), str(path)), str(path))


def _unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's interleaving of rotary halves in Q/K rows (its converter's `permute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name == "rope_freqs.weight":
        return None
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk":
        raise ModelLoadError(f"unexpected tensor {name!r} in GGUF file")
    layer, rest = parts[1], parts[2]
    suffix = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    base, _, kind = rest.rpartition(".")
    if base not in suffix:
        raise ModelLoadError(f"unsupported tensor {name!r} in GGUF file")
    return f"model.layers.{layer}.{suffix[base]}.{kind}"


def _tensors(reader: Any, cfg: dict[str, Any], permuted: bool, dtype: str, source: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from gguf import quants

    torch_dtype = getattr(torch, dtype)
    out: dict[str, Any] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"tensor {t.name} of {source} is {qtype}; quanta dequantizes {', '.join(SUPPORTED_TYPES)}"
            )
        name = _hf_name(t.name)
        if name is None:
            continue
        w = np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        # numpy's shape is GGUF's dimensions reversed, which is torch's (out, in) order.
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, cfg["num_attention_heads"])
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, cfg["num_key_value_heads"])
        # Round to the serving dtype once here, exactly as a float32 load followed by .to(dtype) would.
        out[name] = torch.from_numpy(np.ascontiguousarray(w)).to(torch_dtype)
    return out


def _write_tokenizer(path: Path, folder: Path) -> None:
    """Tokenizer and chat template through transformers' own GGUF tokenizer conversion."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many types for metadata it cannot convert
        raise ModelLoadError(f"cannot read the tokenizer of GGUF file {str(path)!r}: {e}") from None
    tok.save_pretrained(str(folder))


def convert(path: Path, dtype: str, folder: Path) -> None:
    from safetensors.torch import save_file

    reader = _reader(path)
    cfg = hf_config(reader, str(path))  # an unsupported file fails here, before any announcement
    print(f"quanta: dequantizing {path.name} to {dtype} (cached in {folder})", file=sys.stderr)
    cfg["torch_dtype"] = dtype
    permuted = ARCHITECTURES[_field(reader, "general.architecture")][2]
    tensors = _tensors(reader, cfg, permuted, dtype, str(path))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        _write_tokenizer(path, tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path.resolve()), "version": CONVERTER_VERSION}))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent start that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def model_folder(path: str | Path, dtype: str) -> Path:
    """The Hugging Face folder of a GGUF file with weights in `dtype`, converted on first use."""
    path = Path(path)
    if dtype not in STORAGE_DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    folder = _cache_dir(path, dtype)
    if not (folder / "config.json").is_file():
        convert(path, dtype, folder)
    return folder
