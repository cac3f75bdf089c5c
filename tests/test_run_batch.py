"""Offline batch entry points on the real engine (tiny random Llama): LLM.generate(plan="global") and
`quanta run-batch` over OpenAI batch files (bad lines, resuming)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from quanta.engine.batch_file import run_batch
from quanta.engine.llm import LLM
from quanta.engine.llm_engine import EngineArgs, LLMEngine
from quanta.sampling_params import SamplingParams
from quanta.sched.batch_plan import plan_prompts


def shared_prompts(groups: int = 4, size: int = 4, prefix: int = 48, seed: int = 0) -> list[list[int]]:
    """Shuffled prompts of `groups` shared prefixes with short suffixes of their own."""
    g = torch.Generator().manual_seed(seed)
    heads = [torch.randint(3, 512, (prefix,), generator=g).tolist() for _ in range(groups)]
    out = [h + torch.randint(3, 512, (3 + i,), generator=g).tolist() for h in heads for i in range(size)]
    perm = torch.randperm(len(out), generator=g).tolist()
    return [out[i] for i in perm]


def engine_kwargs(policy: str, num_blocks: int = 48) -> dict:
    return dict(
        policy=policy, num_kv_blocks=num_blocks, max_model_len=256, cpu_kernels=False, check_integrity=True
    )


def greedy(llm: LLM, prompts: list[list[int]], plan: str | None) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, plan=plan)
    assert [o.prompt_token_ids for o in outs] == prompts  # in the prompts' order, whatever the plan
    return [o.outputs[0].token_ids for o in outs]


def test_global_plan_gives_the_same_greedy_outputs_with_more_reuse(llama_dir: Path) -> None:
    # 6 groups x 4 prompts with 96-token prefixes; the pool (32 blocks of 16) holds about 4 of them.
    prompts = shared_prompts(groups=6, size=4, prefix=96)
    optimum = plan_prompts(prompts, 16).optimal_saved_tokens // 16
    base = LLM(str(llama_dir), **engine_kwargs("sarathi", 32))
    expected = greedy(base, prompts, None)
    assert base.engine.core.kv.pool.num_cache_hits < optimum
    for policy in ("sarathi", "batch"):
        llm = LLM(str(llama_dir), **engine_kwargs(policy, 32))
        assert greedy(llm, prompts, "global") == expected
        kv = llm.engine.core.kv
        assert kv.pool.num_cache_hits == optimum  # every prefix block computed once
        assert kv.num_free_blocks == kv.num_blocks and not kv.req_blocks  # nothing leaked
    with pytest.raises(ValueError, match="plan"):
        base.generate("hello", plan="local")


def write_lines(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def read_lines(path: Path) -> dict:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return {r["custom_id"] if r["custom_id"] is not None else f"line{r['error']['line']}": r for r in rows}


def chat(cid: str, text: str, **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 5, **body},
    }


def cmpl(cid: str, prompt, **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": prompt, "temperature": 0, "max_tokens": 4, **body},
    }


SYSTEM = "You are a careful assistant who answers briefly. " * 3


def batch_rows() -> list:
    return [
        chat("c1", SYSTEM + "What is a scheduler?"),
        chat("c2", SYSTEM + "What is a KV cache?"),
        cmpl("p1", "Once upon a time"),
        cmpl("p2", [5, 6, 7, 8, 9], n=2),
        cmpl("p3", ["def f(x):", "import os"]),
        "{not json",
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},  # no custom_id
        {"custom_id": "u1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        cmpl("b1", "hi", temperature=5),  # out of range: the API's 400
        chat("b2", "hi", logprobs=True),  # not supported in batch files
        cmpl("b3", [1, 2, 100_000]),  # token id outside the vocabulary
        cmpl("p1", "a duplicate custom_id"),
        chat("c3", SYSTEM + "What is a token?"),
    ]


def check_results(out: dict, llama_dir: Path) -> None:
    assert set(out) == {"c1", "c2", "c3", "p1", "p2", "p3", "line6", "line7", "u1", "b1", "b2", "b3"}
    for cid in ("c1", "c2", "c3"):
        resp = out[cid]["response"]
        assert out[cid]["error"] is None and resp["status_code"] == 200
        body = resp["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    p2 = out["p2"]["response"]["body"]
    assert [c["index"] for c in p2["choices"]] == [0, 1] and p2["usage"]["prompt_tokens"] == 5
    assert p2["choices"][0]["text"] == p2["choices"][1]["text"]  # greedy: both samples alike
    p3 = out["p3"]["response"]["body"]
    assert [c["index"] for c in p3["choices"]] == [0, 1] and p3["object"] == "text_completion"
    # The same greedy text as the offline API gives for the prompt alone.
    llm = LLM(str(llama_dir), num_kv_blocks=48, max_model_len=256, cpu_kernels=False)
    alone = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert out["p1"]["response"]["body"]["choices"][0]["text"] == alone[0].outputs[0].text
    for key, words in (("line6", "invalid JSON"), ("line7", "custom_id"), ("u1", "url must be")):
        assert out[key]["response"] is None and words in out[key]["error"]["message"]
    for cid, words in (("b1", "temperature"), ("b2", "logprobs"), ("b3", "out of range")):
        resp = out[cid]["response"]
        assert resp["status_code"] == 400 and words in resp["body"]["error"]["message"], resp


def test_run_batch_answers_every_line_and_resumes(llama_dir: Path, tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, batch_rows())
    engine = LLMEngine(EngineArgs(model=str(llama_dir), **engine_kwargs("batch")))
    s = run_batch(engine, src, dst, "tiny", progress=False)
    assert (s.completed, s.failed, s.skipped) == (6, 7, 0)  # the duplicate p1 is answered once, a 400
    lines = dst.read_text().splitlines()
    assert len(lines) == 13
    dup = [json.loads(x) for x in lines if json.loads(x)["custom_id"] == "p1"]
    assert sorted(r["response"]["status_code"] for r in dup) == [200, 400]
    out = read_lines(dst)
    out["p1"] = next(r for r in dup if r["response"]["status_code"] == 200)
    check_results(out, llama_dir)
    kv = engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks and not engine.has_unfinished_requests()

    # Interrupted: only some answers made it, the last one cut short. A rerun does the rest.
    kept = [x for x in lines if json.loads(x)["custom_id"] in ("c1", "p2", None)]
    dst.write_text("\n".join(kept) + "\n" + lines[-1][:25])
    s = run_batch(engine, src, dst, "tiny", progress=False)
    assert s.skipped == 4 and s.completed == 4  # c1, p2 and the two bad lines were there
    again = read_lines(dst)
    assert len(dst.read_text().splitlines()) == len(kept) + 4 + 5  # 4 answers, 5 refused bodies
    assert again["c2"]["response"]["body"]["choices"] == out["c2"]["response"]["body"]["choices"]
    # Everything answered: a third run does nothing.
    before = dst.read_text()
    s = run_batch(engine, src, dst, "tiny", progress=False)
    assert (s.completed, s.failed, s.skipped) == (0, 0, 13) and dst.read_text() == before
    assert kv.num_free_blocks == kv.num_blocks


def test_run_batch_cli(llama_dir: Path, tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [chat("a", "Hello"), cmpl("b", "The scheduler decides"), "[1, 2]"])
    args = ["--model", str(llama_dir), "--num-kv-blocks", "48", "--max-model-len", "256"]
    run = run_cli("run-batch", "-i", str(src), "-o", str(dst), *args)
    assert run.returncode == 0, run.stderr
    assert "2 completed, 1 failed, 0 already" in run.stderr
    out = read_lines(dst)
    assert out["a"]["response"]["status_code"] == 200 and out["b"]["response"]["status_code"] == 200
    assert out["line3"]["error"]["message"] == "line 3: expected a JSON object"
    missing = run_cli("run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", str(dst), *args)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"quanta run-batch: error: input file {str(tmp_path / 'nope.jsonl')!r} does not exist"
    ]
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not a batch output\n")
    bad_out = run_cli("run-batch", "-i", str(src), "-o", str(garbage), *args)
    assert bad_out.returncode == 2 and "not a batch output line" in bad_out.stderr
