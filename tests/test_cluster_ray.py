"""`quanta serve --instances 2` on a real local Ray cluster, through the official `openai` client: the
same answers as one engine, an instance actor killed mid-load loses no request, no KV left behind."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_harness import MODEL, Server

if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (pip install -e '.[cluster]')", allow_module_level=True)

PROMPTS = [[1, 5, 9, 3 + i, 7] * (i + 1) for i in range(8)]


@pytest.fixture(scope="module")
def cluster_server(llama_dir: Path) -> Iterator[Server]:
    # The server starts its own local Ray cluster (as `quanta serve --instances 2` does for a user);
    # this process joins it (the address is in /internal/state) to kill an actor. Ray authenticates a
    # local cluster with a token in ~/.ray; a process joining by address must be told to use it before
    # it imports ray.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    srv = Server(llama_dir, "--instances", "2")
    try:
        srv.wait(timeout=240)
        yield srv
    finally:
        srv.stop()
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def expected(llama_dir: Path) -> dict[int, str]:
    """Greedy answers of one engine with the server's settings."""
    from quanta.engine.llm import LLM
    from quanta.sampling_params import SamplingParams

    llm = LLM(
        str(llama_dir), cpu_kernels=False, num_kv_blocks=512, max_model_len=256, max_num_batched_tokens=512
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        use_tqdm=False,
    )
    return {i: o.outputs[0].text for i, o in enumerate(outs)}


LONG = 200  # tokens of the stream migrated mid-way: enough that it cannot end before the migration does


@pytest.fixture(scope="module")
def expected_long(llama_dir: Path) -> str:
    """The greedy answer to PROMPTS[3] with LONG tokens, from one engine with the server's settings."""
    from quanta.engine.llm import LLM
    from quanta.sampling_params import SamplingParams

    llm = LLM(
        str(llama_dir), cpu_kernels=False, num_kv_blocks=512, max_model_len=256, max_num_batched_tokens=512
    )
    out = llm.generate(
        [{"prompt_token_ids": PROMPTS[3]}],
        SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True),
        use_tqdm=False,
    )
    return out[0].outputs[0].text


def complete(srv: Server, i: int, stream: bool) -> str:
    client = srv.client(timeout=120)
    kw = dict(model=MODEL, prompt=PROMPTS[i], max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        return client.completions.create(**kw).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)


def wait_clean(srv: Server) -> dict:
    st = srv.wait_idle(timeout=60)
    assert st["integrity_ok"], st["integrity_error"]
    assert st["num_free_blocks"] == st["num_blocks"], st
    return st


def test_answers_equal_one_engine_and_both_instances_serve(
    cluster_server: Server, expected: dict[int, str]
) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: complete(cluster_server, i, stream=i % 2 == 0), range(len(PROMPTS))))
    assert got == [expected[i] for i in range(len(PROMPTS))]
    st = wait_clean(cluster_server)
    assert [s["alive"] for s in st["instances"]] == [True, True]
    assert all(s["prefix_queries"] > 0 for s in st["instances"]), "dispatch must use both instances"
    m = cluster_server.metrics()
    assert m[("quanta:instance_up", (("instance", "0"), ("model_name", MODEL)))] == 1


@pytest.mark.parametrize("named", [False, True])
def test_a_forced_live_migration_mid_stream_is_invisible_to_the_client(
    cluster_server: Server, expected_long: str, named: bool
) -> None:
    """`named`: the client named the response (X-Request-Id), and /internal/migrate finds it by that name."""
    client = cluster_server.client(timeout=120)
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[3],
        max_tokens=LONG,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": "job-7"} if named else None,
    )
    text, migrated = "", None
    for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        if migrated is None and len(text) > 5:
            owner = next(s["index"] for s in cluster_server.state()["instances"] if s.get("num_running"))
            status, migrated, _ = cluster_server.http(
                "POST", "/internal/migrate", {"request_id": chunk.id, "dst": 1 - owner}
            )
            assert status == 200, migrated
    assert migrated is not None and migrated["committed"], migrated
    assert migrated["downtime_ms"] is not None and migrated["stages"] >= 2
    assert text == expected_long
    st = wait_clean(cluster_server)
    assert st["cluster"]["migrations"] >= 1
    m = cluster_server.metrics()
    assert m[("quanta:migrations_total", (("model_name", MODEL), ("outcome", "committed")))] >= 1
    status, body, _ = cluster_server.http("POST", "/internal/migrate", {"request_id": "nope", "dst": 0})
    assert status == 404 and "no running request" in body["error"]["message"]


def test_offline_llm_spreads_a_batch_over_instances_of_a_running_cluster(
    cluster_server: Server, llama_dir: Path, expected: dict[int, str]
) -> None:
    from quanta.engine.llm import LLM
    from quanta.sampling_params import SamplingParams

    address = cluster_server.state()["cluster"]["ray_address"]
    llm = LLM(
        str(llama_dir),
        instances=2,
        ray_address=address,  # joins the server's cluster: two more actors of its own
        cpu_kernels=False,
        num_kv_blocks=512,
        max_model_len=256,
        max_num_batched_tokens=512,
    )
    try:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in PROMPTS],
            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
            use_tqdm=False,
        )
        assert [o.outputs[0].text for o in outs] == [expected[i] for i in range(len(PROMPTS))]
        st = llm.engine.state()
        assert all(s["prefix_queries"] > 0 for s in st.instances) and st.num_free_blocks == st.num_blocks
    finally:
        llm.shutdown()


def test_killing_an_instance_mid_load_loses_no_request(
    cluster_server: Server, expected: dict[int, str]
) -> None:
    import ray

    st = cluster_server.state()
    if not ray.is_initialized():  # (the offline test joined it already)
        ray.init(address=st["cluster"]["ray_address"], namespace="quanta", log_to_driver=False)
    victim = ray.get_actor(st["instances"][0]["name"])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(complete, cluster_server, i, True) for i in range(len(PROMPTS))]
        deadline = time.monotonic() + 60
        while cluster_server.state()["instances"][0].get("num_running", 0) == 0:
            assert time.monotonic() < deadline, "instance 0 never ran a request"
            time.sleep(0.01)
        ray.kill(victim, no_restart=True)
        got = [f.result(timeout=180) for f in futs]
    assert got == [expected[i] for i in range(len(PROMPTS))]  # greedy: recomputed elsewhere, same tokens
    st = wait_clean(cluster_server)
    assert [s["alive"] for s in st["instances"]] == [False, True]
    assert st["cluster"]["redispatched"] > 0
    m = cluster_server.metrics()
    assert m[("quanta:instance_up", (("instance", "0"), ("model_name", MODEL)))] == 0
    assert m[("quanta:redispatched_requests_total", (("model_name", MODEL),))] > 0
