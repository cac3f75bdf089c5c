"""`quanta make-model`: a random-weight model folder in Hugging Face format, with a locally trained tokenizer.

Weights come from `transformers` (so the folder is exactly what `from_pretrained` reads and writes); the
byte-level BPE tokenizer is trained with `tokenizers` on text found on this machine (Python's standard
library sources), so nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", {**_TINY, "tie_word_embeddings": False}),
    "tiny-qwen2": ("qwen2", {**_TINY, "tie_word_embeddings": True}),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M), for benchmarks.
    "smollm2-135m": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
    ),
}


def _corpus(max_chars: int) -> Iterator[str]:
    """Source text of the standard library (not installed packages), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield text
        total += len(text)
        if total >= max_chars:
            return


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (padded with reserved special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(max_chars=min(400 * vocab_size, 30_000_000)), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    missing = vocab_size - len(hf)
    if missing > 0:
        hf.add_special_tokens({"additional_special_tokens": [f"<|reserved_{i}|>" for i in range(missing)]})
    assert len(hf) == vocab_size, (len(hf), vocab_size)
    return hf


_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def _save_weights(model: Any, out: Path, **kwargs: Any) -> None:
    """save_pretrained, replacing the weights of an earlier save into this folder. save_pretrained
    deletes old shards only: one file written over a sharded save would keep the stale index (which a
    loader may prefer), shards written over one file the stale model.safetensors (which transformers
    prefers). The old files are set aside first and put back if the save fails."""
    old = [p for p in out.iterdir() if _WEIGHT_FILE.fullmatch(p.name) and p.is_file()]
    with tempfile.TemporaryDirectory(dir=out, prefix=".old-weights-") as tmp:
        for p in old:
            p.rename(Path(tmp) / p.name)
        try:
            model.save_pretrained(out, **kwargs)
        except BaseException:
            for p in old:
                (Path(tmp) / p.name).rename(p)
            raise


def make_model(
    out_dir: str | Path,
    preset: str = "tiny-llama",
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    model_type, shape = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(shape["vocab_size"])
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    config = AutoConfig.for_model(
        model_type,
        **shape,
        **overrides,
        bos_token_id=ids[1],
        eos_token_id=ids[2],
        pad_token_id=ids[0],
    )
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    _save_weights(model, out, **kwargs)
    GenerationConfig(eos_token_id=[ids[2], ids[0]], bos_token_id=ids[1], pad_token_id=ids[0]).save_pretrained(
        out
    )
    tokenizer.save_pretrained(out)
    (out / "quanta_make_model.json").write_text(
        json.dumps({"preset": preset, "dtype": dtype, "seed": seed}) + "\n"
    )
    return out
