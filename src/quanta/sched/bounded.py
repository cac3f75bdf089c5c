"""Per-program state that clients create at will (every session_id or program_id is a key): bounded,
whatever they send, by forgetting the keys set longest ago."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

# Programs remembered per policy or router: far more than run at once; an agent idle while this many
# others came and went is taken for a new one when it returns.
MAX_PROGRAMS = 65_536


class RecentDict(OrderedDict[K, V]):
    """A dict of at most `maxlen` keys: setting a key makes it the newest, and past `maxlen` the oldest
    goes. Reading does not refresh a key."""

    def __init__(self, maxlen: int = MAX_PROGRAMS) -> None:
        super().__init__()
        assert maxlen > 0
        self.maxlen = maxlen

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxlen:
            self.popitem(last=False)

    def setdefault(self, key: K, default: V) -> V:  # type: ignore[override]
        if key in self:
            return self[key]
        self[key] = default
        return default
