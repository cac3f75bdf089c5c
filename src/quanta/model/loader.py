"""Load a Hugging Face model folder (config.json + *.safetensors, single or sharded) into LlamaModel."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quanta.model.config import ModelConfig, ModelLoadError
from quanta.model.llama import LlamaModel

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, cfg: ModelConfig, device: str | torch.device = "cpu") -> torch.dtype:
    if name == "auto":
        name = auto_dtype(cfg.dtype, device, lambda: cfg.num_params)
    return dtype_named(name)


def auto_dtype(model_dtype: str, device: str | torch.device, num_params: Callable[[], int]) -> str:
    """What `--dtype auto` loads: the model's own dtype, but float32 on a CPU without bfloat16 arithmetic
    when float32 weights take at most half of the memory. There torch emulates half-precision matmuls,
    several times slower than float32 (an AVX2 VM: 5 against 31 GFLOP/s at prefill sizes, and generating
    1.6x slower end to end)."""
    name = model_dtype if model_dtype in DTYPES else "float32"
    try:
        on_cpu = torch.device(device).type == "cpu"
    except RuntimeError:  # not a device: the executor says so, in its own words
        return name
    if name == "float32" or not on_cpu or cpu_has_bf16():
        return name
    if 4 * num_params() > physical_memory() // 2:
        return name  # float32 would not fit comfortably: keep the smaller dtype, slow as it is
    logger.info("dtype auto: float32, not %s (this CPU has no bfloat16 arithmetic; --dtype sets it)", name)
    return "float32"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read from
    Linux's /proc/cpuinfo; elsewhere it is taken to (the choice made before this was known)."""
    from quanta.model.cpu_kernels import cpuinfo_flags

    flags = cpuinfo_flags()
    if not flags:
        return True
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags.partition(":")[2].split()))


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: no limit


def dtype_named(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unsupported dtype {name!r}; choose from auto, {', '.join(DTYPES)}") from None


def model_path(model: str | Path, dtype: str, device: str | torch.device = "cpu") -> Path:
    """The Hugging Face folder to load: the model itself, or a GGUF file's converted folder (in the
    dtype that `dtype` resolves to on `device`)."""
    from quanta.model.gguf_loader import GGUF_DTYPE, is_gguf, model_folder

    if not is_gguf(model):
        return Path(model)
    name = dtype
    if dtype == "auto":  # the same default for every GGUF file: parsed only to size it for float32
        name = auto_dtype(GGUF_DTYPE, device, lambda: ModelConfig.from_path(model).num_params)
    dtype_named(name)  # a one-line error for an unknown name
    return model_folder(model, name)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files to read, chosen as transformers' `from_pretrained` chooses them: a
    `model.safetensors` first (an index beside it is left over from an earlier sharded save, whose shards
    `save_pretrained` deletes but whose index it keeps), then the index's shards, then any *.safetensors."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        if index.is_file():
            logger.warning("%s: loading model.safetensors, not %s (as transformers does)", path, index.name)
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"malformed {index}: {e}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{str(path)!r} has no *.safetensors weights")
    return files


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    tensors[name] = sf.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"cannot read weights {f}: {e}") from None
    return tensors


def load_model(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    max_positions: int,
    dummy: bool = False,
) -> LlamaModel:
    path = Path(path)
    if dummy:
        return random_model(cfg, dtype, device, block_size, max_positions)
    tensors = _read_tensors(weight_files(path))

    def take(name: str) -> torch.Tensor:
        try:
            return tensors.pop(name)
        except KeyError:
            raise ModelLoadError(f"weights in {str(path)!r} lack tensor {name!r}") from None

    with torch.device("meta"):
        model = LlamaModel(cfg, block_size, max_positions)
    state: dict[str, torch.Tensor] = {"embed_tokens.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        state[dst + "qkv_proj.weight"] = torch.cat([take(attn + f"{p}_proj.weight") for p in "qkv"])
        if cfg.qkv_bias:
            state[dst + "qkv_proj.bias"] = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"])
        state[dst + "o_proj.weight"] = take(attn + "o_proj.weight")
        if cfg.o_bias:
            state[dst + "o_proj.bias"] = take(attn + "o_proj.bias")
        state[dst + "gate_up_proj.weight"] = torch.cat(
            [take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]
        )
        state[dst + "down_proj.weight"] = take(mlp + "down_proj.weight")
        if cfg.mlp_bias:
            state[dst + "gate_up_proj.bias"] = torch.cat([take(mlp + "gate_proj.bias"), take(mlp + "up_proj.bias")])
            state[dst + "down_proj.bias"] = take(mlp + "down_proj.bias")
        state[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        state[dst + "post_attention_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
    state["norm.weight"] = take("model.norm.weight")
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    else:
        tensors.pop("lm_head.weight", None)
    # A layer tensor left over is a part of the model this forward pass would skip (a bias, a scale, a
    # layer past num_hidden_layers): refused rather than run wrong. Rotary tables are recomputed here.
    unused = sorted(n for n in tensors if n.startswith("model.layers.") and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise ModelLoadError(
            f"weights in {str(path)!r} hold tensors the config gives no place to: {', '.join(unused[:3])}{more}"
        )
    for name, tensor in state.items():
        expected = model.get_parameter(name).shape
        if tensor.shape != expected:
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, config implies {tuple(expected)}"
            )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device).eval()


@torch.inference_mode()
def random_model(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, block_size: int, max_positions: int
) -> LlamaModel:
    """Random weights made on the device, no files read (vLLM's --load-format dummy): for benchmarks of
    large shapes where only the config matters."""
    with torch.device("meta"):
        model = LlamaModel(cfg, block_size, max_positions)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = type(model.rotary)(cfg, max_positions).to(device)  # to_empty wiped its tables
    return model.eval()
