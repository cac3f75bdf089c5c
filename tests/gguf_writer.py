"""Write a Hugging Face Llama/Qwen2 folder as a GGUF file the way llama.cpp's converter does (Q/K rows
permuted for llama, byte-level BPE tokenizer in the metadata), with the `gguf` package's writer, so that
the GGUF loading path is tested on a model whose exact weights are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType, quants
from safetensors.numpy import load_file


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute`: interleave each head's two rotary halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    folder: Path, out: Path, qtype: str = "F32", arch: str | None = None, eot: int | None = None
) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = arch or model_type
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = GGUFWriter(str(out), arch)
    writer.add_name("test model")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_vocab_size(cfg["vocab_size"])

    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab.update(special)
    tokens = [None] * cfg["vocab_size"]
    for text, i in vocab.items():
        tokens[i] = text
    assert all(t is not None for t in tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], int) else cfg["eos_token_id"][0])
    if eot is not None:
        writer.add_eot_token_id(eot)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)

    names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    qt = GGMLQuantizationType[qtype]
    for name, w in tensors.items():
        w = w.astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.get("tie_word_embeddings"):
                continue
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            base, _, kind = rest.rpartition(".")
            gname = f"blk.{layer}.{names[base]}.{kind}"
            if model_type == "llama" and base == "self_attn.q_proj":
                w = _permute(w, heads)
            elif model_type == "llama" and base == "self_attn.k_proj":
                w = _permute(w, kv_heads)
        # llama.cpp keeps 1-D tensors (norms, biases) in F32 whatever the file's type.
        if w.ndim == 1 or qt == GGMLQuantizationType.F32:
            writer.add_tensor(gname, w)
        elif qt == GGMLQuantizationType.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            writer.add_tensor(gname, quants.quantize(w, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
