"""MigrationEndpoint: one instance's side of live migrations, as a few coarse calls.

It wraps an EngineCore (and its executor's KV and sampler hooks) with a KVTransport. The Ray runtime
holds one per instance actor and exposes these methods as actor calls (each ~1 ms): every argument and
return value is picklable, and each call runs between engine steps, never during one. The in-process
driver and the simulator call them directly. The migration state machine (quanta.cluster.migration)
decides the order; this class only carries calls out and keeps each side consistent on its own:

  source:       stage_out(rid, start, last=False)  blocks [start, full blocks) while the request decodes
                stage_out(rid, start, last=True)   stops the request, the rest of its blocks + snapshot
                finish_out(rid, committed)         frees it (committed) or takes it back (failed)
  destination:  reserve(rid, n)                    pre-allocates n blocks
                stage_in(rid, out)                 grows the reservation, writes; commits a last stage
                abort_in(rid)                      frees the reservation
                watchdog(timeout_s)                frees reservations idle that long (a dead source)
  either:       state(), abort(rids)               snapshot for the controller; client aborts

Executor hooks used (duck-typed): `read_kv_blocks(block_ids) -> KVPayload`, `write_kv_blocks(block_ids,
payload)`, `get_generator_state(rid) -> bytes | None`, `set_generator_state(rid, state)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quanta.cluster.snapshot import RequestSnapshot
from quanta.cluster.state import InstanceState
from quanta.cluster.transport import KVTransport
from quanta.engine.core import EngineCore
from quanta.kv.manager import cdiv
from quanta.request import RequestStatus


@dataclass(slots=True)
class StageOut:
    """What a source stage hands the controller (and, through it, the destination)."""

    request_id: str
    ok: bool  # False: the request left the schedule (finished, aborted, preempted); nothing was read
    start_block: int = 0
    num_blocks: int = 0  # blocks [start_block, start_block + num_blocks) are in the payload
    total_blocks: int = 0  # blocks the request holds on the source now
    nbytes: int = 0
    handle: Any = None  # the transport's handle to the payload
    snapshot: RequestSnapshot | None = None  # the last stage's: the request stopped on the source


class MigrationEndpoint:
    def __init__(self, core: EngineCore, transport: KVTransport, instance_id: int = 0) -> None:
        self.core = core
        self.transport = transport
        self.instance_id = instance_id
        self.draining = False
        self._preemptions: dict[str, int] = {}  # migrating out: the request's preemption count at stage 1
        self._touched: dict[str, float] = {}  # migrating in: clock time of the last call about it
        self._refused: set[str] = set()  # migrating in, aborted by the client: a later stage_in refuses
        self.num_migrated_out = 0
        self.num_migrated_in = 0

    def state(self) -> InstanceState:
        return self.core.instance_state(self.instance_id, self.draining)

    def abort(self, request_ids: list[str]) -> None:
        """Client aborts: the request here, or its reservation if it is migrating in."""
        self.core.abort_requests(request_ids)
        for rid in request_ids:
            if rid in self.core.kv.reserved:
                self.abort_in(rid)
                self._refused.add(rid)
            elif rid not in self.core.scheduler.requests:  # its migration's reserve may come after this
                self._refused.add(rid)

    # ---- source ------------------------------------------------------------------------------------
    def stage_out(self, request_id: str, start_block: int, last: bool) -> StageOut:
        sched = self.core.scheduler
        req = sched.requests.get(request_id)
        first = request_id not in self._preemptions
        if first and req is not None:
            self._preemptions[request_id] = req.num_preemptions
        if (
            req is None
            or req.finished
            or req.request_id in sched.swapping_in
            or req.num_preemptions != self._preemptions[request_id]  # its KV was dropped and rebuilt
            or req.status != RequestStatus.RUNNING
        ):
            self._preemptions.pop(request_id, None)
            return StageOut(request_id, False)
        blocks = self.core.kv.req_blocks[request_id]
        bs = self.core.kv.block_size
        snapshot = None
        if last:
            end = cdiv(req.num_computed_tokens, bs)
            stopped = sched.stop_for_migration(request_id)
            assert stopped is req
            gen = self.core.executor.get_generator_state(request_id)  # type: ignore[attr-defined]
            snapshot = RequestSnapshot.of(req, gen, self._clock_offset())
        else:
            end = req.num_computed_tokens // bs  # full blocks only: the last one is still being written
        start = min(start_block, end)
        payload = self.core.executor.read_kv_blocks(blocks[start:end])  # type: ignore[attr-defined]
        handle = self.transport.send(payload)
        return StageOut(request_id, True, start, end - start, len(blocks), payload.nbytes, handle, snapshot)

    def finish_out(self, request_id: str, committed: bool) -> bool:
        """After the last stage: committed -> free the request here; not -> it runs here again.
        Returns whether the request is still live (False: it was aborted meanwhile, so the controller
        aborts the destination's copy). A request never stopped here is left alone."""
        self._preemptions.pop(request_id, None)
        sched = self.core.scheduler
        if request_id not in sched.migrating_out:
            return request_id in sched.requests
        if committed:
            live = sched.release_migrated(request_id)
            self.num_migrated_out += live
            return live
        return sched.resume_migrated(request_id)

    # ---- destination --------------------------------------------------------------------------------
    def reserve(self, request_id: str, num_blocks: int) -> bool:
        if request_id in self.core.scheduler.requests:
            return False  # an id in use here (a stale migration): refuse rather than alias
        if not self.core.scheduler.has_free_slot():
            return False  # every sequence slot taken: the request could not run here
        if request_id in self._refused:
            return False  # aborted before its reservation came: a reservation now would be nobody's
        ok = self.core.kv.reserve(request_id, num_blocks)
        if ok:
            self._touched[request_id] = self.core.clock.now()
        return ok

    def stage_in(self, request_id: str, out: StageOut) -> bool:
        """Write a stage's blocks (growing the reservation as needed); a last stage commits the request,
        which then decodes here. False (nothing committed) when the reservation cannot grow, or the
        request was aborted or its reservation freed meanwhile; the controller then aborts."""
        kv = self.core.kv
        if request_id in self._refused or request_id not in kv.reserved:
            return False
        if out.snapshot is not None and not self.core.scheduler.has_free_slot():
            return False  # the slots filled up since the reservation: the source takes the request back
        end = out.start_block + out.num_blocks
        if not kv.reserve(request_id, end):
            return False
        self._touched[request_id] = self.core.clock.now()
        payload = self.transport.recv(out.handle)
        assert payload.num_blocks == out.num_blocks
        executor = self.core.executor
        executor.write_kv_blocks(kv.reserved[request_id][out.start_block : end], payload)  # type: ignore[attr-defined]
        snap = out.snapshot
        if snap is None:
            return True
        assert cdiv(snap.num_computed_tokens, kv.block_size) == end, "the last stage must cover every block"
        req = snap.to_request(self._clock_offset())
        executor.set_generator_state(request_id, snap.generator_state)  # type: ignore[attr-defined]
        self.core.scheduler.commit_migrated(req, self.core.clock.now())
        self._touched.pop(request_id, None)
        self.num_migrated_in += 1
        return True

    def _clock_offset(self) -> float:
        offset = getattr(self.core.clock, "unix_offset", None)
        return offset() if offset is not None else 0.0

    def abort_in(self, request_id: str) -> None:
        self.core.kv.unreserve(request_id)
        self._touched.pop(request_id, None)

    def watchdog(self, timeout_s: float) -> list[str]:
        """Free the reservations no call has touched for `timeout_s` of this instance's clock (their source
        or controller died mid-migration). Returns their request ids."""
        now = self.core.clock.now()
        stale = [rid for rid, t in self._touched.items() if now - t >= timeout_s]
        for rid in stale:
            self.abort_in(rid)
        return stale
