"""The cluster front end over in-process instances (no Ray): the same outputs as one engine, failover
of a dead instance's requests, aborts and stop strings across instances, no KV left behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from quanta.cluster.engine import ClusterEngine
from quanta.cluster.instances import LocalInstances
from quanta.cluster.worker import InstanceWorker
from quanta.engine.llm_engine import EngineArgs, EngineFrontend, LLMEngine
from quanta.engine.output import RequestOutput
from quanta.sampling_params import SamplingParams

PROMPTS = [[1, 5, 9, 3 + i, 7] * (i + 1) for i in range(6)]


def engine_args(model_dir: Path, **kw: object) -> EngineArgs:
    args = dict(cpu_kernels=False, max_model_len=256, num_kv_blocks=64, check_integrity=True)
    return EngineArgs(model=str(model_dir), **{**args, **kw})  # type: ignore[arg-type]


def cluster(
    model_dir: Path, n: int = 2, router: str = "least-load", migration: bool = False, **kw: object
) -> ClusterEngine:
    args = engine_args(model_dir, **kw)
    epoch = time.time()
    workers = [InstanceWorker(args, i, epoch) for i in range(n)]
    return ClusterEngine(args, LocalInstances(workers), epoch=epoch, router=router, migration=migration)


def run(
    engine: EngineFrontend,
    params: SamplingParams | list[SamplingParams],
    prompts: list[list[int]] = PROMPTS,
    on_step=None,
    timeout: float = 120,
) -> dict[str, RequestOutput]:
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params_list)):
        engine.add_request(str(i), p, sp)
    done: dict[str, RequestOutput] = {}
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if on_step is not None:
            on_step(engine, done)
        assert time.monotonic() < deadline, "the cluster did not finish"
    return done


def tokens(done: dict[str, RequestOutput]) -> dict[str, list[list[int]]]:
    return {k: [c.token_ids for c in v.outputs] for k, v in done.items()}


def assert_clean(ce: ClusterEngine) -> None:
    st = ce.state(check=True)
    assert st.integrity_ok, st.integrity_error
    assert st.num_free_blocks == st.num_blocks and st.num_running == st.num_waiting == 0
    assert not ce.live and not ce.owner


@pytest.fixture(scope="module")
def single(llama_dir: Path) -> LLMEngine:
    return LLMEngine(engine_args(llama_dir))


@pytest.fixture
def ce(llama_dir: Path):
    engine = cluster(llama_dir)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=1.0, seed=7, max_tokens=12),
        SamplingParams(temperature=0.8, seed=3, max_tokens=8, n=2, logprobs=2),
    ],
    ids=["greedy", "seeded", "n2-logprobs"],
)
def test_outputs_match_one_engine(single: LLMEngine, ce: ClusterEngine, params: SamplingParams) -> None:
    expected, got = run(single, params), run(ce, params)
    assert tokens(got) == tokens(expected)
    if params.logprobs:
        for k in expected:
            for a, b in zip(expected[k].outputs, got[k].outputs):
                assert [sorted(d) for d in a.logprobs] == [sorted(d) for d in b.logprobs]
    # Both instances served (least-load dispatch spreads the prompts).
    assert all(s["prefix_queries"] > 0 for s in ce.state().instances)
    assert_clean(ce)


def test_stop_string_found_by_the_front_end_ends_the_request_on_its_instance(
    single: LLMEngine, ce: ClusterEngine
) -> None:
    base = run(single, SamplingParams(temperature=0, max_tokens=16))["0"].outputs[0].text
    stop = base[4:7]
    assert stop, "the tiny model's text must be long enough to cut"
    params = SamplingParams(temperature=0, max_tokens=16, stop=[stop])
    expected, got = run(single, params), run(ce, params)
    assert {k: v.outputs[0].text for k, v in got.items()} == {
        k: v.outputs[0].text for k, v in expected.items()
    }
    assert got["0"].outputs[0].finish_reason == "stop"
    assert_clean(ce)


def test_a_dead_instance_s_requests_finish_elsewhere(single: LLMEngine, ce: ClusterEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = run(single, params)
    killed = []

    def kill_once(engine: ClusterEngine, done: dict) -> None:
        # Kill instance 0 once it has produced some tokens of the requests it owns.
        if not killed and any(r.num_output_tokens >= 3 for r in engine.live.values()):
            engine.instances.kill(0)
            killed.append(True)

    got = run(ce, params, on_step=kill_once)
    assert killed
    assert ce.num_redispatched > 0
    assert tokens(got) == tokens(expected)  # greedy: recomputing the context gives the same tokens
    assert [s["alive"] for s in ce.state().instances] == [False, True]
    assert_clean(ce)
    assert ce.healthy()  # one instance still answers
    ce.instances.kill(1)
    ce._health = (-1.0, True)  # asked long ago: the next /health asks again
    assert not ce.healthy()  # nobody answers, though no step has noticed


def test_abort_frees_the_owner_s_blocks(ce: ClusterEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        ce.add_request(str(i), p, params)
    deadline = time.monotonic() + 60
    while not all(r.num_output_tokens > 2 for r in ce.live.values()):
        ce.step()
        assert time.monotonic() < deadline
    ce.abort_request([str(i) for i in range(len(PROMPTS))])
    assert not ce.has_unfinished_requests()
    deadline = time.monotonic() + 30
    while ce.state().num_free_blocks != ce.state().num_blocks:  # the aborts land between steps
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert_clean(ce)


def test_a_request_an_instance_refuses_leaves_nothing_behind(ce: ClusterEngine) -> None:
    with pytest.raises(ValueError, match="prompt has"):
        ce.add_request("long", list(range(1, 300)), SamplingParams(max_tokens=2))
    assert not ce.has_unfinished_requests()
    assert_clean(ce)


def step_until(ce: ClusterEngine, cond, done: dict, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for out in ce.step():
            if out.finished:
                done[out.request_id] = out
        assert time.monotonic() < deadline, "timed out"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=1.0, seed=11, max_tokens=40, ignore_eos=True),
    ],
    ids=["greedy-logprobs", "seeded"],
)
def test_a_live_migration_mid_decode_changes_nothing_the_client_sees(
    single: LLMEngine, ce: ClusterEngine, params: SamplingParams
) -> None:
    expected = run(single, params)
    for i, p in enumerate(PROMPTS):
        ce.add_request(str(i), p, params)
    done: dict[str, RequestOutput] = {}
    step_until(ce, lambda: all(r.num_output_tokens >= 5 for r in ce.live.values()), done)
    moving = [rid for rid, owner in ce.owner.items() if owner == 0][:2]
    for rid in moving:
        ce.migrate(rid, 1)
    step_until(ce, lambda: not ce.has_unfinished_requests(), done)
    assert tokens(done) == tokens(expected)
    for k in expected:  # the logprobs of every token, those around the migration included
        assert [c.logprobs is None or len(c.logprobs) for c in done[k].outputs] == [
            c.logprobs is None or len(c.logprobs) for c in expected[k].outputs
        ]
    committed = [m for m in ce.done_migrations if m.committed]
    assert sorted(m.request_id for m in committed) == sorted(moving)
    assert all(m.downtime is not None and m.num_stages >= 2 for m in committed)
    assert_clean(ce)


def test_aborting_a_request_mid_migration_frees_both_sides(ce: ClusterEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        ce.add_request(str(i), p, params)
    done: dict[str, RequestOutput] = {}
    step_until(ce, lambda: all(r.num_output_tokens >= 3 for r in ce.live.values()), done)
    rid = next(rid for rid, owner in ce.owner.items() if owner == 0)
    m = ce.migrate(rid, 1)
    ce.step()  # the reservation is made on the destination
    ce.abort_request(rid)
    step_until(ce, lambda: m.finished or rid not in ce.migrations, done)
    ce.abort_request([r for r in list(ce.live)])
    deadline = time.monotonic() + 30
    while ce.state().num_free_blocks != ce.state().num_blocks:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert_clean(ce)


def test_a_migration_outliving_every_request_is_settled_by_the_engine_loop(ce: ClusterEngine) -> None:
    """Only step() settles migrations: the cluster has unfinished work while one is in flight, even with
    no request left (a server's engine thread stopped stepping, and /internal/migrate waited 60 s)."""
    ce.add_request("r", PROMPTS[2], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    done: dict[str, RequestOutput] = {}
    step_until(ce, lambda: ce.live["r"].num_output_tokens >= 3, done)
    with pytest.raises(ValueError, match="no instance 7: the instances are 0 to 1"):
        ce.migrate("r", 7)
    m = ce.migrate("r", 1 - ce.owner["r"])
    ce.abort_request("r")
    assert not ce.live and ce.has_unfinished_requests()
    deadline = time.monotonic() + 30
    while ce.has_unfinished_requests():  # the engine loop, as the server's runs it
        ce.step()
        assert time.monotonic() < deadline
    assert m.finished and not ce.migrations
    while ce.state().num_free_blocks != ce.state().num_blocks:  # the aborts reach the instances
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert_clean(ce)


def test_migration_to_a_full_destination_leaves_the_request_running(
    llama_dir: Path, single: LLMEngine
) -> None:
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = run(single, params, prompts=PROMPTS[:1])
    ce = cluster(llama_dir)
    try:
        # Fill instance 1's pool with a long prompt, then try to move instance 0's request there.
        ce.add_request("0", PROMPTS[0], params)
        ce.add_request(
            "filler", list(range(1, 250)), SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        )
        done: dict[str, RequestOutput] = {}
        step_until(ce, lambda: ce.live["0"].num_output_tokens >= 3, done)
        assert ce.owner["0"] != ce.owner["filler"]
        src, dst = ce.owner["0"], ce.owner["filler"]
        m = ce.migrate("0", dst, num_blocks=10_000)  # more than the destination holds
        step_until(ce, lambda: "0" in done, done)
        assert m.finished and not m.committed and m.reason == "destination full"
        assert (
            ce.owner.get("0") is None and done["0"].outputs[0].token_ids == expected["0"].outputs[0].token_ids
        )
        assert src != dst
        ce.abort_request("filler")
        deadline = time.monotonic() + 30
        while ce.state().num_free_blocks != ce.state().num_blocks:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert_clean(ce)
    finally:
        ce.shutdown()


def test_the_rescheduler_migrates_under_memory_pressure_without_changing_outputs(
    llama_dir: Path,
) -> None:
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    # Round-robin sends the long prompts to instance 0 and the short ones to instance 1: instance 0 runs
    # out of blocks while instance 1 has plenty, so the balanced rescheduler moves requests across.
    # Six long requests need 90 blocks of instance 0's 64 (its queue blocks, it preempts), six short ones
    # leave instance 1 half empty: a source and a destination under either pairing.
    prompts = [[1, 5, 9, 3 + i, 7] * (36 if i % 2 == 0 else 2) for i in range(12)]
    one = LLMEngine(engine_args(llama_dir, num_kv_blocks=128))
    expected = run(one, params, prompts=prompts)
    ce = cluster(llama_dir, num_kv_blocks=64, router="round-robin", migration=True)
    try:
        got = run(ce, params, prompts=prompts)
        assert tokens(got) == tokens(expected)
        assert ce.done_migrations, "a small pool under long outputs must trigger the rescheduler"
        assert_clean(ce)
    finally:
        ce.shutdown()
