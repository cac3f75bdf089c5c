"""Tokenizer of a model folder.

Encoding and decoding use `tokenizers` directly (fast to load); the `transformers` tokenizer, which
renders chat templates, is loaded on first use so that start-up does not pay for importing it.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from quanta.model.config import ModelLoadError


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        self.path = Path(path)
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{str(self.path)!r} has no tokenizer.json")
        try:
            self.backend = FastTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ModelLoadError(f"cannot load {tok_file}: {e}") from None
        self.eos_token_id = self._special_token_id("eos_token")

    def _special_token_id(self, key: str) -> int | None:
        cfg_file = self.path / "tokenizer_config.json"
        try:
            token = json.loads(cfg_file.read_text()).get(key) if cfg_file.is_file() else None
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"malformed {cfg_file}: {e}") from None
        if isinstance(token, dict):
            token = token.get("content")
        return self.backend.token_to_id(token) if isinstance(token, str) else None

    @cached_property
    def hf(self) -> Any:
        """The `transformers` tokenizer of the folder (chat templates, anything else users expect)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:  # transformers raises many types for a broken folder
            raise ModelLoadError(f"cannot load the tokenizer in {str(self.path)!r}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if isinstance(text, str):  # `tokenizers` refuses lone surrogates (bytes not UTF-8): a TypeError
                check_text(text)
            raise

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """The conversation as the model's template renders it; `continue_final_message` leaves the last
        message open (its closing tokens cut), so the answer goes on with it."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template")
        return self.hf.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )


def check_text(text: str, what: str = "the prompt") -> None:
    """ValueError unless `text` is valid Unicode: a lone surrogate (Python's stand-in for a byte that was not
    UTF-8, as in a command-line argument) cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        byte = f" (byte 0x{c - 0xDC00:02x}, not UTF-8)" if 0xDC80 <= c <= 0xDCFF else ""
        raise ValueError(
            f"{what} is not valid text: a lone surrogate U+{c:04X} at character {e.start}{byte}"
        ) from None
