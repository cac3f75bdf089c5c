"""Tokenizer of a model folder, through `transformers` (encode, decode, chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quanta.model.config import ModelLoadError


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{str(path)!r} has no tokenizer.json")
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many types for a broken folder
            raise ModelLoadError(f"cannot load the tokenizer in {str(path)!r}: {e}") from None
        self.backend = self.hf.backend_tokenizer  # tokenizers.Tokenizer, for incremental decoding
        self.eos_token_id: int | None = self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template")
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
