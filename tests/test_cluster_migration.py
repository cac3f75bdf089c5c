"""Live migration between two in-process engines with a tiny random-weight model (real ModelExecutor,
no Ray): output identical to a single-instance run, and every abort rule leaves both sides clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from quanta.cluster.local import LocalCluster
from quanta.cluster.migration import Migration, Phase
from quanta.config import CacheConfig, SchedulerConfig
from quanta.engine.clock import WallClock
from quanta.engine.core import EngineCore
from quanta.executor.model_executor import ModelExecutor
from quanta.request import Request, RequestStatus
from quanta.sampling_params import SamplingParams

BS = 4
PROMPT = [(7 * i + 3) % 500 + 3 for i in range(22)]


def engine(model: Path, num_blocks: int = 48) -> EngineCore:
    cache = CacheConfig(block_size=BS, num_blocks=num_blocks)
    return EngineCore(
        ModelExecutor(model, cache, 128, 4, dtype="float32", seed=5),
        WallClock(),
        SchedulerConfig("sarathi", 64, 4, 128),
        cache,
        check_integrity=True,
    )


def request(seeded: bool, max_tokens: int = 30, rid: str = "r") -> Request:
    params = (
        SamplingParams(temperature=1.0, seed=1234, max_tokens=max_tokens, ignore_eos=True)
        if seeded
        else SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    )
    return Request(rid, list(PROMPT), params, arrival_time=0.0)


@pytest.fixture(scope="module")
def cores(llama_dir: Path) -> list[EngineCore]:
    return [engine(llama_dir), engine(llama_dir)]


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> dict[bool, list[int]]:
    out = {}
    for seeded in (False, True):
        core = engine(llama_dir)
        req = request(seeded)
        core.add_request(req)
        while core.has_unfinished():
            core.step()
        out[seeded] = req.output_token_ids
    return out


def cluster_of(cores: list[EngineCore], **kw) -> LocalCluster:
    for c in cores:
        assert not c.has_unfinished() and c.kv.num_free_blocks == c.kv.num_blocks
    return LocalCluster(cores, router="round-robin", **kw)


def step_checked(cl: LocalCluster) -> None:
    cl.step()
    for c in cl.cores:
        c.scheduler.check_integrity()


def finish(cl: LocalCluster) -> None:
    """Run to the end; then no block may be held anywhere."""
    n = 0
    while cl.has_unfinished():
        step_checked(cl)
        n += 1
        assert n < 1000
    for c in cl.cores:
        c.scheduler.check_integrity()
        assert c.kv.num_free_blocks == c.kv.num_blocks, "leaked KV blocks"
        assert not c.kv.reserved and not c.scheduler.migrating_out and not c.scheduler.requests


def decode(cl: LocalCluster, req: Request, n: int) -> None:
    while req.num_output_tokens < n:
        step_checked(cl)


def advance_to(cl: LocalCluster, m: Migration, phase: Phase) -> None:
    """Step the cluster (engines, then one migration phase) until the migration is about to run `phase`."""
    while m.phase != phase:
        assert not m.finished, f"migration ended early: {m.reason}"
        step_checked(cl)


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_migrated_request_continues_identically(cores, reference, seeded: bool) -> None:
    cl = cluster_of(cores)
    got: dict[str, Request] = {}
    cl.step_observers.append(lambda i, out: got.update({r.request_id: r for r in out.updated if i == 1}))
    req = request(seeded)
    cl.add_request(req, instance=0)
    decode(cl, req, 6)
    m = cl.migrate(req.request_id, 1)
    while not m.finished:
        step_checked(cl)
    assert m.committed, m.reason
    assert m.num_stages >= 2 and m.downtime is not None and m.bytes_moved > 0
    assert cl.owner[req.request_id] == 1
    # The source decoded while the stages copied: the request moved with more tokens than it had.
    moved_at = len(req.output_token_ids)
    assert moved_at > 6
    finish(cl)
    dst_req = got[req.request_id]
    assert dst_req is not req and dst_req.status == RequestStatus.FINISHED_LENGTH
    assert dst_req.output_token_ids == reference[seeded]
    assert dst_req.output_token_ids[:moved_at] == req.output_token_ids
    # One timestamp per token, in order, the first kept from the source.
    assert len(dst_req.times.tokens) == len(dst_req.output_token_ids)
    # Timestamps moved into the destination clock's frame: the time to first token is the source's.
    ttft = req.times.first_token - req.times.arrival
    assert dst_req.times.first_token - dst_req.times.arrival == pytest.approx(ttft, abs=1e-3)
    assert list(dst_req.times.tokens) == sorted(dst_req.times.tokens)
    assert cl.endpoints[0].num_migrated_out == 1 and cl.endpoints[1].num_migrated_in == 1


def test_abort_during_an_early_stage_frees_both_sides(cores) -> None:
    cl = cluster_of(cores)
    req = request(False)
    cl.add_request(req, instance=0)
    decode(cl, req, 3)
    m = cl.migrate(req.request_id, 1)
    advance_to(cl, m, Phase.STAGE_IN)  # a stage read on the source, not yet written
    assert cl.cores[1].kv.reserved
    cl.abort(req.request_id)  # reaches the owner and the destination
    assert not cl.cores[1].kv.reserved
    step_checked(cl)
    assert m.phase == Phase.ABORTED
    assert req.status == RequestStatus.FINISHED_ABORTED
    finish(cl)


def test_abort_at_the_source_only_ends_the_migration(cores) -> None:
    cl = cluster_of(cores)
    req = request(False)
    cl.add_request(req, instance=0)
    decode(cl, req, 3)
    m = cl.migrate(req.request_id, 1)
    advance_to(cl, m, Phase.STAGE_OUT)
    cl.endpoints[0].abort([req.request_id])
    step_checked(cl)
    assert m.phase == Phase.ABORTED and m.reason == "request left the source"
    finish(cl)


@pytest.mark.parametrize("reaches", ["both", "source"])
def test_abort_during_the_last_stage(cores, reaches: str) -> None:
    cl = cluster_of(cores)
    req = request(False)
    cl.add_request(req, instance=0)
    decode(cl, req, 3)
    m = cl.migrate(req.request_id, 1)
    advance_to(cl, m, Phase.COMMIT)  # the source stopped the request and read the rest
    assert req.request_id in cl.cores[0].scheduler.migrating_out
    if reaches == "both":
        cl.abort(req.request_id)
    else:
        cl.endpoints[0].abort([req.request_id])
    step_checked(cl)
    assert m.finished and not m.committed
    assert m.reason == ("destination full" if reaches == "both" else "aborted while stopped")
    assert req.status == RequestStatus.FINISHED_ABORTED
    assert not cl.cores[1].scheduler.requests  # the destination's copy went too
    finish(cl)


def test_a_stop_string_during_the_last_stage_ends_the_request_on_the_source(cores) -> None:
    """The front end finishes a request (a stop string in its text) while its migration has stopped it on
    the source: the source must not resume it when the commit fails (it decoded on for nobody)."""
    cl = cluster_of(cores)
    req = request(False, max_tokens=100)
    cl.add_request(req, instance=0)
    decode(cl, req, 3)
    m = cl.migrate(req.request_id, 1)
    advance_to(cl, m, Phase.COMMIT)
    src = cl.cores[0]
    src.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)  # what the front end sends its owner
    cl.endpoints[1].abort([req.request_id])  # ... and the migration's destination
    step_checked(cl)
    assert m.finished and not m.committed
    assert req.request_id not in src.scheduler.requests and not src.has_unfinished()
    finish(cl)
    assert req.num_output_tokens < 100


def test_request_finishing_during_a_stage(cores, reference) -> None:
    cl = cluster_of(cores, max_stages=100, last_stage_blocks=0)  # keeps staging until the request ends
    req = request(False)
    cl.add_request(req, instance=0)
    decode(cl, req, 2)
    m = cl.migrate(req.request_id, 1)
    while not m.finished:
        step_checked(cl)
    assert m.phase == Phase.ABORTED and m.reason == "request left the source"
    assert m.num_stages >= 2
    finish(cl)
    assert req.output_token_ids == reference[False]


def test_full_destination_source_keeps_the_request(cores, reference) -> None:
    cl = cluster_of(cores)
    dst = cl.cores[1].kv
    assert dst.reserve("filler", dst.num_blocks)  # nothing left to pre-allocate
    req = request(False)
    cl.add_request(req, instance=0)
    decode(cl, req, 3)
    m = cl.migrate(req.request_id, 1)
    step_checked(cl)
    assert m.phase == Phase.ABORTED and m.reason == "destination full"
    dst.unreserve("filler")
    finish(cl)
    assert req.output_token_ids == reference[False]


def test_destination_without_a_free_sequence_slot_refuses(cores, reference) -> None:
    cl = cluster_of(cores)
    dst = cl.cores[1].scheduler
    fillers = [request(False, max_tokens=40, rid=f"f{i}") for i in range(dst.config.max_num_seqs)]
    for f in fillers:
        cl.add_request(f, instance=1)
    req = request(False)
    cl.add_request(req, instance=0)
    while len(dst.running) < dst.config.max_num_seqs or req.num_output_tokens < 3:
        step_checked(cl)
    assert cl.cores[1].kv.num_free_blocks > 0  # the slots are the limit, not the blocks
    m = cl.migrate(req.request_id, 1)
    step_checked(cl)
    assert m.phase == Phase.ABORTED and m.reason == "destination full"
    finish(cl)
    assert req.output_token_ids == reference[False]


def test_destination_full_at_the_last_stage_source_takes_the_request_back(cores, reference) -> None:
    cl = cluster_of(cores, max_stages=2)  # stage 1, then the last
    req = request(False)
    cl.add_request(req, instance=0)
    decode(cl, req, 3)
    m = cl.migrate(req.request_id, 1)
    # Pre-allocate one block: stage 1 grows the reservation to the full blocks, and the request decodes
    # at least two more tokens before the last stage, so that one must grow it again.
    m.num_blocks = 1
    advance_to(cl, m, Phase.COMMIT)
    dst = cl.cores[1].kv
    held = len(dst.reserved[req.request_id])
    assert m._out is not None and m._out.start_block + m._out.num_blocks > held, "the last stage must grow"
    assert dst.reserve("filler", dst.num_free_blocks)  # the reservation cannot grow now
    step_checked(cl)
    assert m.phase == Phase.ABORTED and cl.owner[req.request_id] == 0
    assert req.status == RequestStatus.RUNNING and req in cl.cores[0].scheduler.running
    dst.unreserve("filler")
    finish(cl)
    assert req.output_token_ids == reference[False]


def test_watchdog_frees_the_reservation_of_a_dead_source(cores, reference) -> None:
    cl = cluster_of(cores)
    req = request(False)
    cl.add_request(req, instance=0)
    decode(cl, req, 3)
    m = cl.migrate(req.request_id, 1)
    advance_to(cl, m, Phase.STAGE_OUT)
    advance_to(cl, m, Phase.STAGE_IN)
    step_checked(cl)  # one stage written on the destination
    del cl.migrations[req.request_id]  # the controller and the source go silent
    del cl.view.migrations[req.request_id]
    dst = cl.endpoints[1]
    assert dst.watchdog(3600.0) == [] and dst.core.kv.reserved
    assert dst.watchdog(0.0) == [req.request_id]
    assert not dst.core.kv.reserved
    finish(cl)
    assert req.output_token_ids == reference[False]


class Remote:
    """An endpoint behind a process boundary, as a Ray actor is: every argument and return value goes
    through pickle (and the KV payload through the transport's handle)."""

    def __init__(self, endpoint) -> None:
        self._endpoint = endpoint

    def __getattr__(self, name: str):
        import pickle

        method = getattr(self._endpoint, name)

        def call(*args, **kwargs):
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
            return pickle.loads(pickle.dumps(method(*args, **kwargs)))

        return call


class PickledTransport:
    """Payloads cross as bytes (what an object store holds)."""

    def send(self, payload):
        import pickle

        return pickle.dumps(payload)

    def recv(self, handle):
        import pickle

        return pickle.loads(handle)

    def seconds(self, nbytes: int) -> float:
        return 0.0


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_migration_across_a_pickling_boundary(cores, reference, seeded: bool) -> None:
    cl = cluster_of(cores, transport=PickledTransport())
    got: dict[str, Request] = {}
    cl.step_observers.append(lambda i, out: got.update({r.request_id: r for r in out.updated if i == 1}))
    req = request(seeded)
    cl.add_request(req, instance=0)
    decode(cl, req, 5)
    m = Migration(req.request_id, 0, 1, len(cores[0].kv.req_blocks[req.request_id]))
    src, dst = Remote(cl.endpoints[0]), Remote(cl.endpoints[1])
    while not m.finished:
        step_checked(cl)
        m.advance(src, dst, 0.0)
    assert m.committed, m.reason
    finish(cl)
    assert got[req.request_id].output_token_ids == reference[seeded]
