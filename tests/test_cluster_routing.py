"""The cluster's global scheduler on real (simulated-executor) engines: snapshots, load metrics,
counted dispatches, routers and the Llumnix rescheduler."""

from __future__ import annotations

import math

import pytest

from helpers import make_request, null_engine, run_to_end
from quanta.cluster.load import freeness, kv_ratio, token_load, vllm_load
from quanta.cluster.local import LocalCluster
from quanta.cluster.prefix_index import PrefixIndex
from quanta.cluster.rescheduler import Rescheduler
from quanta.cluster.router import dispatch, make_router, router_names
from quanta.cluster.state import InstanceState
from quanta.cluster.view import ClusterView
from quanta.engine.core import EngineCore


def state(**kw) -> InstanceState:
    base = dict(
        instance_id=0,
        time=0.0,
        block_size=4,
        num_blocks=100,
        num_free_blocks=50,
        watermark_blocks=1,
        num_running=4,
        num_waiting=0,
        hol_demand_blocks=0,
        waiting_demand_blocks=0,
        uncomputed_prefill_tokens=0,
        decode_batch_size=4,
        sum_context_tokens=200,
        num_high_priority=0,
        num_preempted_waiting=0,
        num_preemptions=0,
        num_added=0,
    )
    base.update(kw)
    return InstanceState(**base)


def test_load_metrics() -> None:
    s = state()
    assert freeness(s) == (50 - 1) / 4
    # The head of the queue counts its demand, and the queue one more request.
    q = state(num_waiting=3, hol_demand_blocks=9, waiting_demand_blocks=20)
    assert freeness(q) == (50 - 1 - 9) / 5
    assert freeness(q, all_waiting=True) == (50 - 1 - 20) / 5
    assert freeness(state(num_high_priority=2), priority_headroom_blocks=5) == (50 - 1 - 10) / 4
    assert freeness(state(draining=True)) == -math.inf
    assert kv_ratio(q) == (50 + 20) / 100
    assert vllm_load(q) == 4 * 3 + 4
    assert token_load(state(uncomputed_prefill_tokens=30)) == 230


def cores(n: int = 2, num_blocks: int = 256) -> list[EngineCore]:
    return [null_engine(num_blocks=num_blocks, max_model_len=num_blocks * 4) for _ in range(n)]


def test_instance_state_reports_queue_and_prefix_hash_deltas() -> None:
    core = null_engine(num_blocks=64, budget=64, max_model_len=256)
    assert core.instance_state().stored_hashes == []
    core.add_request(make_request("a", 18, 4))  # 4 full blocks of 4 tokens
    core.add_request(make_request("b", 40, 4, first_token=100))
    s = core.instance_state(3)
    assert (s.instance_id, s.num_waiting, s.num_running, s.num_added) == (3, 2, 0, 2)
    assert s.hol_demand_blocks == 5 and s.waiting_demand_blocks == 5 + 10
    assert s.uncomputed_prefill_tokens == 58
    run_to_end(core)
    s = core.instance_state()
    assert len(s.stored_hashes) >= 4 + 10 and not s.evicted_hashes
    assert core.instance_state().stored_hashes == []  # only what is new since the last snapshot
    core.kv.reset_prefix_cache()
    assert len(core.instance_state().evicted_hashes) == len(s.stored_hashes)


def test_prefix_hash_log_is_bounded_and_resyncs_with_the_whole_index() -> None:
    """A reader that stops taking snapshots (a router that never reads KV) must not make the log grow
    without bound: past twice the pool's size it stops, and the next snapshot carries the whole index,
    which replaces the mirror (a stale hash read as held would be a hit the router invents)."""
    core = null_engine(num_blocks=32, budget=64, max_model_len=128)
    index = PrefixIndex(core.kv.block_size)
    index.update(core.instance_state())
    for k in range(40):  # 40 distinct prompts of 4 full blocks each through a 32-block pool
        core.add_request(make_request(f"r{k}", 16, 1, first_token=1000 * k))
        run_to_end(core)
        pool = core.kv.pool
        logged = len(pool._stored or ()) + len(pool._evicted or ())
        assert logged <= 2 * core.kv.num_blocks
    s = core.instance_state()
    assert s.hashes_whole and not s.evicted_hashes
    assert set(s.stored_hashes) == set(core.kv.pool._cached)
    index.dispatched(0, [b"stale"])  # what the mirror assumed before
    index.update(s)
    assert index._hashes[0] == set(core.kv.pool._cached)
    # The log runs again: deltas from here on.
    core.add_request(make_request("again", 16, 1, first_token=99_000))
    run_to_end(core)
    s = core.instance_state()
    assert not s.hashes_whole and len(s.stored_hashes) == 4 and len(s.evicted_hashes) == 4
    index.update(s)
    assert index._hashes[0] == set(core.kv.pool._cached)


def test_dispatches_count_at_once_and_reconcile_with_the_next_snapshot() -> None:
    cl = LocalCluster(cores(2), router="least-load")
    # No poll between dispatches: counted dispatches keep a burst from herding onto one instance.
    for i in range(6):
        cl.add_request(make_request(f"r{i}", 8, 4, first_token=10 * i))
    assert [len(c.scheduler.requests) for c in cl.cores] == [3, 3]
    assert [cl.view.num_pending(i) for i in (0, 1)] == [3, 3]
    cl.poll()
    assert [cl.view.num_pending(i) for i in (0, 1)] == [0, 0]
    assert [cl.view.state(i).num_waiting for i in (0, 1)] == [3, 3]
    cl.run_to_end()


def test_round_robin_skips_draining_instances() -> None:
    view = ClusterView(4)
    for i, c in enumerate(cores(3)):
        view.update(c.instance_state(i))
    rr = make_router("round-robin")
    assert [dispatch(rr, view, make_request(f"a{i}", 4, 1)) for i in range(4)] == [0, 1, 2, 0]
    view.drain(1)
    assert [dispatch(rr, view, make_request(f"b{i}", 4, 1)) for i in range(3)] == [2, 0, 2]
    # Instances that come and go after the view listed its ids.
    view.update(cores(1)[0].instance_state(3))
    assert view.dispatchable() == [0, 2, 3] and view.instance_ids == [0, 1, 2, 3]
    view.remove(0)
    assert view.dispatchable() == [2, 3] and view.instance_ids == [1, 2, 3]


def test_freeness_router_prefers_free_memory() -> None:
    cs = cores(2, num_blocks=64)
    cs[0].add_request(make_request("big", 150, 4))
    cs[0].step()
    view = ClusterView(4)
    for i, c in enumerate(cs):
        view.update(c.instance_state(i))
    assert freeness(view.state(0)) < freeness(view.state(1))
    assert dispatch(make_router("freeness"), view, make_request("x", 8, 4)) == 1


def test_power_of_two_picks_the_less_loaded_of_two() -> None:
    cs = cores(2)
    for i in range(5):
        cs[0].add_request(make_request(f"q{i}", 8, 4, first_token=10 * i))
    view = ClusterView(4)
    for i, c in enumerate(cs):
        view.update(c.instance_state(i))
    router = make_router("power-of-two", seed=3)
    assert router.choose(make_request("x", 8, 4), view) == 1


def test_session_router_is_sticky() -> None:
    view = ClusterView(4)
    for i, c in enumerate(cores(3)):
        view.update(c.instance_state(i))
    router = make_router("session")
    first = make_request("s1", 8, 4)
    first.session_id = "chat"
    i = dispatch(router, view, first)
    for k in range(3):  # the least-loaded fallback would go elsewhere now
        again = make_request(f"s{k + 2}", 8, 4)
        again.session_id = "chat"
        assert dispatch(router, view, again) == i
    view.drain(i)
    moved = make_request("s9", 8, 4)
    moved.session_id = "chat"
    assert dispatch(router, view, moved) != i


def test_prefix_router_follows_the_cache_within_the_imbalance_guard() -> None:
    cl = LocalCluster(cores(2), router=make_router("prefix", guard=2))
    shared = list(range(500, 540))  # 10 blocks of 4
    warm = make_request("warm", 0 + 1, 2)
    warm.prompt_token_ids = warm.all_token_ids = [*shared, 1]
    cl.add_request(warm, instance=1)
    cl.run_to_end()
    cl.poll()
    assert cl.view.prefix.num_hashes(1) >= 10 and cl.view.prefix.num_hashes(0) == 0

    def turn(rid: str):
        r = make_request(rid, 1, 2)
        r.prompt_token_ids = [*shared, 7]
        r.all_token_ids = list(r.prompt_token_ids)
        return r

    assert cl.add_request(turn("t1")) == 1
    assert cl.add_request(turn("t2")) == 1
    assert cl.add_request(turn("t3")) == 1
    # Instance 1 now holds 3 more requests than instance 0: past the guard, the cache no longer wins.
    assert cl.add_request(turn("t4")) == 0
    cl.run_to_end()


def test_rescheduler_balanced_pairs_the_worst_with_the_best() -> None:
    cs = cores(3, num_blocks=64)
    for i in range(4):
        cs[0].add_request(make_request(f"r{i}", 40 + 8 * i, 60, first_token=100 * i))
    for _ in range(3):
        cs[0].step()
    view = ClusterView(4)
    for i, c in enumerate(cs):
        view.update(c.instance_state(i))
    assert freeness(view.state(0)) < 3.0
    orders = Rescheduler("balanced", threshold=3.0).plan(view)
    assert len(orders) == 1
    (o,) = orders
    assert (o.src, o.request_id) == (0, "r0")  # shortest first
    assert o.dst in (1, 2) and o.num_blocks == len(cs[0].kv.req_blocks["r0"])
    decoding = [r.request_id for r in view.state(0).running if r.decoding]
    assert "r3" not in decoding  # still computing its prompt: only decoding requests move
    assert Rescheduler("balanced", choice="longest").plan(view)[0].request_id == decoding[-1]
    # One migration per instance at a time.
    view.migrations["r0"] = (0, o.dst)
    assert Rescheduler("balanced").plan(view) == []


def test_rescheduler_drains_a_free_instance_and_defrag_needs_a_blocked_queue() -> None:
    cs = cores(2)
    cs[0].add_request(make_request("a", 8, 40))
    cs[0].step()
    view = ClusterView(4)
    for i, c in enumerate(cs):
        view.update(c.instance_state(i))
    assert Rescheduler("balanced").plan(view) == []  # both are free
    assert Rescheduler("defrag").plan(view) == []  # no queue is blocked
    view.drain(0)
    (o,) = Rescheduler("balanced").plan(view)
    assert (o.src, o.dst, o.request_id) == (0, 1, "a")


def test_bad_router_and_rescheduler_arguments() -> None:
    assert set(router_names()) >= {
        "round-robin",
        "least-load",
        "power-of-two",
        "freeness",
        "session",
        "prefix",
    }
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        make_router("nope")
    with pytest.raises(ValueError, match="unknown load metric"):
        make_router("least-load", metric="x")
    with pytest.raises(ValueError, match="router prefix"):
        make_router("prefix", lamda=1.0)
    with pytest.raises(ValueError, match="unknown migration pairing"):
        Rescheduler("random")


def test_cluster_code_imports_neither_torch_nor_ray() -> None:
    import subprocess
    import sys

    mods = (
        "state load view prefix_index router routers rescheduler snapshot transport endpoint migration local"
        " instances remote worker engine"  # the front end too: it runs where no model is loaded
    )
    code = (
        "import sys, quanta.sim.simulation, quanta.server.api_server, quanta.cli\n"
        + "".join(f"import quanta.cluster.{m}\n" for m in mods.split())
        + "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'torch or ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
