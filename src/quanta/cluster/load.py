"""Load metrics over an `InstanceState` (higher = busier for loads, higher = freer for freeness).

- `freeness`: Llumnix's. Virtual usage counts the blocks running requests hold (the free count already
  excludes them), the head-of-line queued request's demand (so an instance whose queue is blocked looks
  busy: the rescheduler moves requests away from it, which de-fragments its memory) or, with
  `all_waiting`, every queued request's, and a headroom per high-priority request. Dividing by the
  number of running requests (+1 for a non-empty queue) gives roughly the decode steps left before
  memory runs out. A draining instance is -inf: it takes nothing and gives everything away.
- `kv_ratio`: blocks in use plus queued demand, over the pool.
- `vllm_load`: `4 * waiting + running`, the score vLLM's data-parallel load balancer uses.
- `token_load`: tokens of work the instance holds: prefill still to compute plus the context its decode
  steps read.
"""

from __future__ import annotations

import math

from quanta.cluster.state import InstanceState


def freeness(s: InstanceState, priority_headroom_blocks: int = 0, all_waiting: bool = False) -> float:
    if s.draining:
        return -math.inf
    demand = s.waiting_demand_blocks if all_waiting else s.hol_demand_blocks
    virtual_free = (
        s.num_free_blocks - s.watermark_blocks - demand - priority_headroom_blocks * s.num_high_priority
    )
    return virtual_free / (s.num_running + (1 if s.num_waiting else 0) or 1)


def kv_ratio(s: InstanceState) -> float:
    if s.draining:
        return math.inf
    used = s.num_blocks - s.num_free_blocks + s.waiting_demand_blocks
    return used / s.num_blocks


def vllm_load(s: InstanceState) -> float:
    return math.inf if s.draining else 4 * s.num_waiting + s.num_running


def token_load(s: InstanceState) -> float:
    return math.inf if s.draining else s.uncomputed_prefill_tokens + s.sum_context_tokens


def request_load(s: InstanceState) -> float:
    """Outstanding requests (running and waiting): the classic least-load score."""
    return math.inf if s.draining else s.num_running + s.num_waiting


LOADS = {"requests": request_load, "vllm": vllm_load, "tokens": token_load, "kv": kv_ratio}
