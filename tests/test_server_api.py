"""Server options the command line does not set yet, on servers started in this process (real engine, real
HTTP on 127.0.0.1, the official `openai` client): API keys bound to tenants and priority ranges, the cap on
tenant metric labels, and chat messages with tool calls rendered through the chat template."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")

from quanta.server.auth import KeyPolicy, load_api_keys, parse_int_range  # noqa: E402
from quanta.server.metrics import OTHER_TENANT  # noqa: E402
from server_harness import MODEL, InProcessServer  # noqa: E402

KEYS = {"key-a": KeyPolicy(tenant="team-a", priority=(0, 5)), "key-any": KeyPolicy()}
PLAIN_KEY = "plain"


@pytest.fixture(scope="module")
def keyed(llama_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(llama_dir, api_key=PLAIN_KEY, api_keys=KEYS, priority_range=(-10, 10)) as srv:
        yield srv


def _tenant_series(metrics: dict, name: str) -> dict[str, float]:
    return {dict(lab)["tenant"]: v for (n, lab), v in metrics.items() if n == name and "tenant" in dict(lab)}


def test_keys_bind_tenants_and_priorities(keyed: InProcessServer) -> None:
    for key in ("none", "key-", "key-ab", "KEY-A"):
        with pytest.raises(openai.AuthenticationError):
            keyed.client(key).models.list()
    a, anyone, plain = keyed.client("key-a"), keyed.client("key-any"), keyed.client(PLAIN_KEY)
    assert plain.models.list().data[0].id == MODEL
    kw = dict(model=MODEL, prompt="hi", max_tokens=2)
    before = _tenant_series(keyed.metrics(), "quanta:request_success_total")

    # key-a runs as team-a whatever else the body says; naming another tenant is refused (403).
    a.completions.create(**kw)
    a.completions.create(**kw, extra_body={"tenant": "team-a", "priority": 5})
    a.completions.create(**kw, user="someone-else")  # OpenAI's `user` does not pick a tenant
    with pytest.raises(openai.PermissionDeniedError) as e:
        a.completions.create(**kw, extra_body={"tenant": "team-b"})
    assert e.value.body["param"] == "tenant"
    for priority in (-1, 6):  # outside the key's range [0, 5]
        with pytest.raises(openai.BadRequestError) as e:
            a.completions.create(**kw, extra_body={"priority": priority})
        assert e.value.body["param"] == "priority" and "[0, 5]" in e.value.body["message"]

    # Unbound keys choose their tenant (or "default"), within the server's priority range [-10, 10].
    anyone.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        extra_body={"tenant": "team-b"},
    )
    plain.completions.create(**kw, extra_body={"priority": -10})
    with pytest.raises(openai.BadRequestError) as e:
        anyone.completions.create(**kw, extra_body={"priority": 11})
    assert e.value.body["param"] == "priority"

    after = _tenant_series(keyed.metrics(), "quanta:request_success_total")
    gained = {t: v - before.get(t, 0) for t, v in after.items() if v != before.get(t, 0)}
    assert gained == {"team-a": 3, "team-b": 1, "default": 1}
    st = keyed.wait_idle(headers={"Authorization": f"Bearer {PLAIN_KEY}"})
    assert st["integrity_ok"] and st["num_free_blocks"] == st["num_blocks"]


def test_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"k1": {"tenant": "team-a", "priority": [0, 5]}, "k2": {}}))
    assert load_api_keys(path) == {"k1": KeyPolicy("team-a", (0, 5)), "k2": KeyPolicy()}
    for bad in (
        [],
        {},
        {"k": {"tenant": "a b"}},
        {"k": {"priority": [5, 0]}},
        {"k": {"priority": 3}},
        {"k": {"tenants": "x"}},
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            load_api_keys(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(tmp_path / "missing.json")
    assert parse_int_range("-5,5") == (-5, 5)
    with pytest.raises(ValueError):
        parse_int_range("5,-5")


def test_tenant_labels_are_capped(llama_dir: Path) -> None:
    with InProcessServer(llama_dir, max_tenant_labels=10) as srv:
        client = srv.client()

        def one(i: int) -> None:
            client.completions.create(
                model=MODEL, prompt=[5, 6], max_tokens=1, extra_body={"tenant": f"t{i}"}
            )

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(300)))
        metrics = srv.metrics()
        tenants = {dict(lab)["tenant"] for _, lab in metrics if "tenant" in dict(lab)}
        assert len(tenants) == 11 and OTHER_TENANT in tenants  # 10 named, the other 290 together
        done = _tenant_series(metrics, "quanta:request_success_total")
        assert sum(done.values()) == 300 and done[OTHER_TENANT] == 290
        series = [k for k in metrics if k[0] == "quanta:time_to_first_token_seconds_count"]
        assert len(series) == 11


TOOL_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}"
    "{% if m.name is defined %} name={{ m.name }}{% endif %}"
    "{% if m.tool_call_id is defined %} id={{ m.tool_call_id }}{% endif %}>"
    "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}"
    "[{{ c.id }} {{ c.function.name }}(city={{ c.function.arguments.city }})]"
    "{% endfor %}{% endif %}{{ m.content }}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def tool_model(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model with a chat template that prints tool calls, names and call ids."""
    folder = tmp_path_factory.mktemp("tool-template")
    for f in llama_dir.iterdir():
        if f.name != "chat_template.jinja":
            os.symlink(f, folder / f.name)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return folder


def test_chat_keeps_tool_calls_names_and_call_ids(tool_model: Path) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        {"role": "user", "content": "weather?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    with InProcessServer(tool_model) as srv:
        status, out, _ = srv.http("POST", "/tokenize", {"messages": messages, "add_generation_prompt": False})
        assert status == 200, out
        text = srv.http("POST", "/detokenize", {"tokens": out["tokens"]})[1]["prompt"]
        assert text == (
            "<user name=ann>weather?\n<assistant>[call_1 weather(city=Oslo)]\n<tool id=call_1>sunny\n"
        )
        chat = srv.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert chat.usage.prompt_tokens == out["count"]


def test_metrics_stay_bounded_over_ten_thousand_tenants() -> None:
    """10,000 tenants (each with a finished request, its tokens, TTFT and ITL) make no more series than
    the cap: the exposition is the same size at 10,000 tenants as at the first 200."""
    from prometheus_client import generate_latest

    from quanta.request import Request, RequestStatus
    from quanta.sampling_params import SamplingParams
    from quanta.server.metrics import ServerMetrics

    metrics = ServerMetrics("m", block_size=16)  # the default cap: 100 tenants

    def serve(tenant: str) -> None:
        req = Request(tenant, [1, 2, 3], SamplingParams(max_tokens=2), arrival_time=0.0, tenant=tenant)
        step = SimpleNamespace(updated=[req])  # what the step observer reads of a StepOutput
        for token, now in ((5, 0.1), (6, 0.2)):  # the first token (TTFT), then the second (ITL)
            req.append_output_token(token, now)
            metrics._observe_tokens(step)  # type: ignore[arg-type]
        req.status = RequestStatus.FINISHED_LENGTH
        req.times.finished = 0.2
        metrics._observe_finished(req)

    for i in range(200):
        serve(f"tenant-{i}")
    at_cap = len(generate_latest(metrics.registry))
    for i in range(200, 10_000):
        serve(f"tenant-{i}")
    text = generate_latest(metrics.registry).decode()
    assert len(text) <= 1.05 * at_cap  # counts grow by digits, not by series
    tenants = {line.split('tenant="')[1].split('"')[0] for line in text.splitlines() if 'tenant="' in line}
    assert len(tenants) == 101 and OTHER_TENANT in tenants
