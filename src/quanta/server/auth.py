"""API keys: one plain key, or a table of keys each bound to a tenant and a range of priorities.

Keys are compared in constant time: each presented key is hashed, and its digest is compared with every
configured key's digest (hmac.compare_digest), so neither the time nor the path taken depends on which key,
or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quanta.server.protocol import MAX_TENANT_LEN, TENANT_PATTERN


@dataclass(slots=True, frozen=True)
class KeyPolicy:
    """What a key may ask for. `tenant`: requests with this key run as this tenant (None: the body's
    `tenant`, or "default"). `priority`: the inclusive range of priorities the key may ask for (None: the
    server's range)."""

    tenant: str | None = None
    priority: tuple[int, int] | None = None


class _KeyEntry(BaseModel):
    """One entry of the key file, validated."""

    model_config = ConfigDict(extra="forbid")

    tenant: str | None = Field(None, min_length=1, max_length=MAX_TENANT_LEN, pattern=TENANT_PATTERN)
    priority: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> _KeyEntry:
        if self.priority is not None and self.priority[0] > self.priority[1]:
            raise ValueError(f"priority range {list(self.priority)} is empty (low > high)")
        return self


def load_api_keys(path: str | Path) -> dict[str, KeyPolicy]:
    """Read a key file: `{"KEY": {"tenant": "team-a", "priority": [0, 5]}, "OTHER": {}}`.

    Raises ValueError with a one-line message for a missing or malformed file.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the API key file {str(path)!r}: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"the API key file {str(path)!r} must be a non-empty JSON object of keys")
    keys: dict[str, KeyPolicy] = {}
    for key, entry in data.items():
        if not key:
            raise ValueError(f"the API key file {str(path)!r} has an empty key")
        try:
            parsed = _KeyEntry.model_validate(entry if entry is not None else {})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ValueError(
                f"API key file {str(path)!r}, a key's {where or 'entry'}: {err['msg']}"
            ) from None
        keys[key] = KeyPolicy(parsed.tenant, parsed.priority)
    return keys


def parse_int_range(text: str) -> tuple[int, int]:
    """Parse "LOW,HIGH" into (LOW, HIGH), for command-line options."""
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected LOW,HIGH (two integers), got {text!r}") from None
    if low > high:
        raise ValueError(f"the range {text!r} is empty (LOW > HIGH)")
    return low, high


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyTable:
    """The configured keys. `check` returns the presented key's policy, or None if it is not a key."""

    def __init__(self, api_key: str | None = None, api_keys: dict[str, KeyPolicy] | None = None) -> None:
        entries = dict(api_keys or {})
        if api_key:
            entries.setdefault(api_key, KeyPolicy())
        self._entries = [(_digest(k), policy) for k, policy in entries.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def check(self, authorization: str | None) -> KeyPolicy | None:
        scheme, _, token = (authorization or "").partition(" ")
        presented = _digest(token.strip() if scheme.lower() == "bearer" else "")
        found = None
        for digest, policy in self._entries:  # no early exit: every key is compared
            if hmac.compare_digest(presented, digest):
                found = policy
        return found
