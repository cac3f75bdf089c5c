"""KVTransport: how a migration's KV payload gets from the source instance to the destination.

The source endpoint reads the blocks through its executor (`read_kv_blocks` -> KVPayload) and calls
`send`, which returns a picklable handle; the controller passes the handle to the destination endpoint,
which calls `recv` and writes the payload (`write_kv_blocks`). `seconds(nbytes)` prices a copy for the
simulator (and for reports). Implementations here: in-process (tests: the handle is the payload) and
simulated (size-only payloads, priced by link bandwidth + latency). The Ray object store and
torch.distributed pairs live with the Ray runtime (they need ray / torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class KVPayload:
    """Every layer's K and V of some blocks. `data` is the executor's (a CPU tensor for ModelExecutor,
    None for SimExecutor, whose payloads only have a size)."""

    num_blocks: int
    nbytes: int
    data: Any = None


class KVTransport(Protocol):
    def send(self, payload: KVPayload) -> Any:
        """On the source: hand the payload over; returns a picklable handle for `recv`."""
        ...

    def recv(self, handle: Any) -> KVPayload:
        """On the destination: the payload `send` handed over."""
        ...

    def seconds(self, nbytes: int) -> float:
        """How long moving `nbytes` takes (0 where not modelled)."""
        ...


class InProcessTransport:
    """Both instances in one process: the handle is the payload."""

    def __init__(self) -> None:
        self.bytes_moved = 0

    def send(self, payload: KVPayload) -> KVPayload:
        self.bytes_moved += payload.nbytes
        return payload

    def recv(self, handle: KVPayload) -> KVPayload:
        return handle

    def seconds(self, nbytes: int) -> float:
        return 0.0


class SimulatedTransport(InProcessTransport):
    """A link priced by the cost model: latency + bytes / bandwidth (defaults: 25 GB/s, as a PCIe 4 x16
    or a 200 Gb/s NIC pair, and 1 ms per transfer for the calls that start it)."""

    def __init__(self, bandwidth_bytes_per_s: float = 25e9, latency_s: float = 1e-3) -> None:
        super().__init__()
        if bandwidth_bytes_per_s <= 0 or latency_s < 0:
            raise ValueError("link bandwidth must be positive and latency not negative")
        self.bandwidth = bandwidth_bytes_per_s
        self.latency = latency_s

    def seconds(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bandwidth
