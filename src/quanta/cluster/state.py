"""InstanceState: what one engine instance reports to the cluster's global scheduler, per poll.

`EngineCore.instance_state()` produces it between steps; it is a plain picklable dataclass (a Ray actor
returns it to the controller as is). Routers and the rescheduler read only these snapshots (plus the
dispatches made since, see `ClusterView`), never an engine: the same code runs in the simulator, where
polling on a period models how stale a real controller's view is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quanta.kv.block_pool import BlockHash


@dataclass(slots=True)
class RunningInfo:
    """One running request, as the rescheduler needs it to pick what to migrate."""

    request_id: str
    num_tokens: int  # context so far (prompt + outputs)
    num_blocks: int  # KV blocks it holds
    decoding: bool  # its prompt is computed (only decoding requests are migrated)
    priority: int
    arrival_time: float


@dataclass(slots=True)
class InstanceState:
    instance_id: int
    time: float  # the instance's clock when the snapshot was taken
    block_size: int
    num_blocks: int
    num_free_blocks: int  # allocatable now (evictable cached blocks included)
    watermark_blocks: int  # headroom kept free (as vLLM's 1% watermark)
    num_running: int
    num_waiting: int
    hol_demand_blocks: int  # blocks the head-of-line waiting request needs to be admitted
    waiting_demand_blocks: int  # blocks every waiting request needs, in all
    uncomputed_prefill_tokens: int  # prompt tokens still to compute (running and waiting)
    decode_batch_size: int  # running requests whose prompt is computed
    sum_context_tokens: int  # context tokens of running requests (what each decode step reads)
    num_high_priority: int  # unfinished requests more important than the default (priority < 0)
    num_preempted_waiting: int  # preempted requests queued to resume
    num_preemptions: int  # preemptions since the instance started (a counter)
    num_added: int  # add_request calls since the instance started: reconciles dispatches (ClusterView)
    draining: bool = False
    running: list[RunningInfo] = field(default_factory=list)
    # Prefix-cache hashes indexed and evicted since the previous snapshot; with `hashes_whole`, the
    # stored ones are the whole index instead (the first snapshot, or the instance's log overflowed).
    stored_hashes: list[BlockHash] = field(default_factory=list)
    evicted_hashes: list[BlockHash] = field(default_factory=list)
    hashes_whole: bool = False
    migrating: list[str] = field(default_factory=list)  # request ids in a migration here (either side)

    @property
    def num_requests(self) -> int:
        return self.num_running + self.num_waiting

    def __post_init__(self) -> None:
        assert 0 <= self.num_free_blocks <= self.num_blocks, "free blocks out of range"
        assert self.num_running >= 0 and self.num_waiting >= 0
