"""Command-line and library options refused in one line, before a model load where that is possible."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from quanta import LLM
from quanta.cli import main


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> str:
    """`quanta ARGV` fails with exit 2 and a single stderr line holding `message`; that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    return err


# ---- 1, 2: engine sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--max-model-len", "-5", "--max-model-len must be at least 2, got -5"),
        ("--max-model-len", "0", "--max-model-len must be at least 2, got 0"),
        ("--max-num-seqs", "0", "--max-num-seqs must be at least 1, got 0"),
        ("--max-num-seqs", "-1", "--max-num-seqs must be at least 1, got -1"),
        ("--max-num-batched-tokens", "0", "--max-num-batched-tokens must be at least 1, got 0"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "serve", "run-batch"])
def test_engine_sizes_below_the_minimum_are_refused_before_the_model(
    capsys: pytest.CaptureFixture, tmp_path: Path, command: str, flag: str, value: str, message: str
) -> None:
    # A model folder that does not exist: the option error comes first.
    extra = {"serve": ["--port", "0"], "run-batch": ["-i", __file__, "-o", str(tmp_path / "o.jsonl")]}
    argv = [command, "--model", str(tmp_path / "no-model"), flag, value, *extra.get(command, [])]
    one_line_error(capsys, argv, message)


@pytest.mark.parametrize("name,value", [("max_model_len", 0), ("max_model_len", -5), ("max_num_seqs", 0),
                                        ("max_num_batched_tokens", 0)])  # fmt: skip
def test_library_refuses_zero_sizes_instead_of_the_default(llama_dir: Path, name: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{name} must be at least"):
        LLM(str(llama_dir), num_kv_blocks=32, **{name: value})


def test_scheduler_sizes_are_checked_before_the_kv_pool_is_sized(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import quanta.executor.model_executor as me

    def no_executor(*args: object, **kwargs: object) -> None:
        raise AssertionError("the executor was built (weights loaded, KV pool sized) before the check")

    monkeypatch.setattr(me, "ModelExecutor", no_executor)
    with caplog.at_level(logging.WARNING, logger="quanta"):
        with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be at least max_num_seqs"):
            LLM(str(llama_dir), max_num_batched_tokens=8, max_num_seqs=16)
        with pytest.raises(ValueError, match="max_num_seqs must be at least 1"):
            LLM(str(llama_dir), max_num_seqs=-1)
    assert "lowering max_model_len" not in caplog.text


def test_negative_max_num_seqs_prints_no_false_kv_warning(
    capsys: pytest.CaptureFixture, llama_dir: Path
) -> None:
    one_line_error(
        capsys,
        ["generate", "--model", str(llama_dir), "--prompt", "hi", "--max-num-seqs", "-1"],
        "--max-num-seqs must be at least 1",
    )


# ---- 3: text that is not UTF-8 -------------------------------------------------------------------------


def test_prompt_that_is_not_utf8_is_refused_before_the_model(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    # Python decodes the argument bytes b"\xff\xfe" to lone surrogates.
    one_line_error(
        capsys,
        ["generate", "--model", str(tmp_path / "no-model"), "--prompt", "\udcff\udcfe"],
        "--prompt is not valid text: a lone surrogate U+DCFF at character 0 (byte 0xff, not UTF-8)",
    )


def test_prompt_bytes_that_are_not_utf8_from_a_real_command_line(llama_dir: Path) -> None:
    for chat in ([], ["--chat"]):
        proc = subprocess.run(
            [sys.executable, "-m", "quanta.cli", "generate", "--model", str(llama_dir), "--prompt", b"a\xff\xfe",
             "--max-tokens", "2", *chat],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "quanta generate: error: --prompt is not valid text: a lone surrogate U+DCFF at character 1 "
            "(byte 0xff, not UTF-8)"
        ]


def test_library_lone_surrogate_is_a_value_error(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), num_kv_blocks=32)
    with pytest.raises(ValueError, match="not valid text: a lone surrogate U\\+DCFF"):
        llm.generate("\udcff", use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    tok = llm.engine.tokenizer
    with pytest.raises(ValueError, match="lone surrogate U\\+D800 at character 2"):
        tok.encode("ab\ud800")
    with pytest.raises(TypeError):  # not text at all: still the type's error
        tok.encode(None)  # type: ignore[arg-type]
    assert tok.encode("ab") == llm.engine.tokenizer.backend.encode("ab").ids


# ---- 4, 5: serve options before the model loads ---------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (("--port", "70000"), "--port must be 0-65535, got 70000"),
        (("--port", "-1"), "--port must be 0-65535, got -1"),
        (("--policy", "nope"), "unknown policy 'nope'"),
        (("--policy-args", "[1]"), "--policy-args must be a JSON object of named settings"),
        (
            ("--policy", "continuum", "--policy-args", '{"ttl_s": "abc"}'),
            "--policy-args for policy 'continuum': bad setting ttl_s='abc'",
        ),
        (
            ("--policy", "vtc", "--policy-args", '{"tenant_weights": 3}'),
            "--policy-args for policy 'vtc': bad setting tenant_weights=3",
        ),
    ],
)
def test_serve_options_are_checked_before_the_model_loads(
    capsys: pytest.CaptureFixture, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    port = [] if "--port" in args else ["--port", "0"]
    one_line_error(capsys, ["serve", "--model", str(tmp_path / "no-model"), *port, *args], message)


def test_serve_batch_dir_that_is_a_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    a_file = tmp_path / "bfile"
    a_file.write_text("x")
    for path in (a_file, a_file / "sub"):
        one_line_error(
            capsys,
            ["serve", "--model", str(tmp_path / "no-model"), "--port", "0", "--batch-dir", str(path)],
            f"--batch-dir {path}:",
        )


def test_serve_max_model_len_above_the_context_before_the_load(
    capsys: pytest.CaptureFixture, llama_dir: Path
) -> None:
    err = one_line_error(
        capsys,
        ["serve", "--model", str(llama_dir), "--port", "0", "--max-model-len", "100000"],
        "--max-model-len 100000 exceeds the model's context (1024)",
    )
    assert "loading" not in err


def test_policies_build_with_their_defaults() -> None:
    """The pre-load policy check refuses none of the policies without settings."""
    import quanta.sched.policies  # noqa: F401
    from quanta.cli import _check_policy
    from quanta.sched.policy import POLICIES

    for name in POLICIES:
        _check_policy(name, None)
        _check_policy(name, {})


# ---- 6, 7: profile -------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_profile_output_is_checked_before_measuring(
    capsys: pytest.CaptureFixture, tmp_path: Path, where: str
) -> None:
    out = tmp_path / "nodir" / "sub" / "p.json" if where == "missing-folder" else tmp_path
    message = "does not exist" if where == "missing-folder" else "is a folder"
    # A model that does not exist: the --out error must come first.
    err = one_line_error(
        capsys,
        ["profile", "--model", str(tmp_path / "no-model"), "--no-grid", "--repeats", "1", "--out", str(out)],
        f"--out {out}: ",
    )
    assert message in err


@pytest.mark.parametrize("repeats", ["0", "-1"])
def test_profile_repeats_below_one(capsys: pytest.CaptureFixture, tmp_path: Path, repeats: str) -> None:
    out = str(tmp_path / "p.json")
    argv = ["profile", "--model", str(tmp_path / "no-model"), "--repeats", repeats, "--out", out]
    one_line_error(capsys, argv, f"--repeats must be at least 1, got {repeats}")
    from quanta.profiling import run_profile

    with pytest.raises(ValueError, match="repeats must be at least 1"):
        run_profile(tmp_path / "no-model", repeats=int(repeats))


# ---- 11: the ready line --------------------------------------------------------------------------------


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_serve_ready_line_gives_a_usable_url(llama_dir: Path) -> None:
    """--port 0 prints the port bound, and an IPv6 host is in brackets: the URL printed answers."""
    argv = ["serve", "--model", str(llama_dir), "--host", "::1", "--port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "quanta.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = ""
        for line in proc.stderr:
            if "ready" in line:
                break
        assert "ready" in line and "http://[::1]:" in line, line
        url = line.split(" on ", 1)[1].strip()
        port = int(url.split("]:", 1)[1].split("/", 1)[0])
        assert port != 0
        with urllib.request.urlopen(f"{url.removesuffix('/v1')}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- 12: simulate a model folder within its context ----------------------------------------------------


def test_simulate_model_folder_caps_max_model_len_at_its_context(
    capsys: pytest.CaptureFixture, llama_dir: Path
) -> None:
    from quanta.cli import _sim_max_model_len, build_parser

    argv = ["simulate", "--model", str(llama_dir), "--trace", "arxiv", "--qps", "2"]
    args = build_parser().parse_args(argv)
    _sim_max_model_len(args)
    assert args.max_model_len == 1024  # the folder's max_position_embeddings, as the engine lowers it
    assert "max_model_len 1024: the model's context" in capsys.readouterr().err
    preset = build_parser().parse_args(["simulate", "--model", "llama-3.1-8b"])
    _sim_max_model_len(preset)
    assert preset.max_model_len == 8192  # presets keep the default
    one_line_error(
        capsys,
        ["simulate", "--model", str(llama_dir), "--trace", "arxiv", "--qps", "2", "--max-model-len", "4096"],
        "--max-model-len 4096 exceeds the model's context (1024)",
    )


def test_simulate_model_folder_draws_requests_within_its_context(
    capsys: pytest.CaptureFixture, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import quanta.sim.simulation as simulation

    seen = []
    real = simulation.simulate

    def spy(workload, cfg, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((list(workload), cfg))
        return real(workload, cfg, **kwargs)

    monkeypatch.setattr(simulation, "simulate", spy)
    out = tmp_path / "r.json"
    argv = ["simulate", "--model", str(llama_dir), "--trace", "arxiv", "--qps", "2", "--num-requests", "5"]
    assert main([*argv, "--json", str(out)]) == 0
    workload, cfg = seen[0]
    assert cfg.max_model_len == 1024
    assert max(w.prompt_len + w.output_len for w in workload) <= 1024
    assert json.loads(out.read_text())


def test_simulate_leaves_out_prompts_longer_than_the_context_and_says_so(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,100,5\n0.5,3000,5\n1,200,5\n")
    out = tmp_path / "r.json"
    argv = ["simulate", "--trace", str(trace), "--model", "llama-3.1-8b", "--max-model-len", "2048"]
    assert main([*argv, "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 of 3 requests have prompts of --max-model-len (2048) tokens or more (the longest: 3000)" in err
    assert "--max-model-len 3001 replays them" in err
    assert json.loads(out.read_text())[0]["num_requests"] == 2
    one_line_error(capsys, [*argv[:-1], "64"], "every prompt has --max-model-len (64) tokens or more (the shortest: 100)")


def test_simulate_cuts_a_traces_head_and_names_the_presets_for_an_unknown_trace(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    trace = tmp_path / "t.csv"
    rows = "".join(f"{t},{50 + t},3\n" for t in (5, 0, 3, 1, 4, 2))  # not in arrival order
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + rows)
    out = tmp_path / "r.json"
    argv = ["simulate", "--trace", str(trace), "--model", "llama-3.1-8b", "--json", str(out)]
    assert main([*argv, "--duration", "3.5", "--num-requests", "3"]) == 0
    assert json.loads(out.read_text())[0]["num_requests"] == 3  # arrivals 0, 1, 2
    assert main([*argv, "--duration", "2.5"]) == 0
    assert json.loads(out.read_text())[0]["num_requests"] == 3  # arrivals 0, 1, 2 (before 2.5)
    capsys.readouterr()
    one_line_error(
        capsys, ["simulate", "--trace", "chat", "--qps", "1"], "--trace 'chat' is neither a file nor a preset (sharegpt,"
    )


def test_simulate_a_mooncake_trace_reports_its_prefix_sharing(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    trace = tmp_path / "mooncake_trace.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8, 9]}\n'
        '{"timestamp": 2500, "input_length": 600, "output_length": 3, "hash_ids": [7, 10]}\n'
    )
    assert main(["simulate", "--trace", str(trace), "--model", "llama-3.1-8b"]) == 0
    captured = capsys.readouterr()
    assert "read as Mooncake trace" in captured.err
    # Block 7 (512 of the 1,700 prompt tokens) is computed once.
    assert "prefill tokens saved by the prefix cache: sarathi 30.1% (optimum 30.1%)" in captured.out


def test_python_dash_m_quanta_is_the_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "quanta", "simulate", "--max-model-len", "-3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--max-model-len must be at least 2" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "flag,value,message",
    [("--seed", str(2**70), "seed must fit in 64 bits"), ("--kv-cache-memory-gb", "nan", "kv_cache_memory_gb must be")],
)
def test_seed_and_kv_memory_out_of_range_are_one_line_errors(
    capsys: pytest.CaptureFixture, llama_dir: Path, flag: str, value: str, message: str
) -> None:
    """A seed past 64 bits failed the first step; a NaN KV memory failed sizing the pool, in torch's words."""
    one_line_error(capsys, ["generate", "--model", str(llama_dir), "--prompt", "hi", "--max-tokens", "2", flag, value], message)


def test_simulate_a_sharegpt_file_replays_what_bench_serve_sends(
    capsys: pytest.CaptureFixture, tmp_path: Path, llama_dir: Path
) -> None:
    import argparse

    from quanta.bench.serve import build_workload
    from quanta.bench.serve_args import add_bench_serve_args

    turns = [("Tell me a story about a dragon", "Once upon a time " * 30), ("Hi", "Hello! How can I help?")]
    data = [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]} for p, a in turns * 6]
    data.append({"messages": [{"role": "user", "content": "only one turn"}]})  # skipped, as vLLM skips it
    path = tmp_path / "ShareGPT_V3_unfiltered_cleaned_split.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "r.json"
    argv = ["simulate", "--trace", str(path), "--model", str(llama_dir), "--num-requests", "8", "--qps", "4"]
    assert main([*argv, "--seed", "3", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"8 of 13 ShareGPT-style conversations (tokens counted by {llama_dir})" in err
    row = json.loads(out.read_text())[0]
    # bench serve with the same file, seed, rate and tokenizer sends these very requests.
    p = argparse.ArgumentParser()
    add_bench_serve_args(p)
    bench = p.parse_args(
        ["--base-url", "http://x", "--model", "m", "--workload", str(path), "--num-prompts", "8", "--seed", "3",
         "--request-rate", "4", "--tokenizer", str(llama_dir)]
    )  # fmt: skip
    sent = build_workload(bench)
    tokens = row["total_token_throughput"] * row["duration"]
    outputs = row["output_throughput"] * row["duration"]
    assert row["num_requests"] == len(sent) == 8
    assert outputs == pytest.approx(sum(r.output_len for r in sent))
    assert tokens - outputs == pytest.approx(sum(r.prompt_len for r in sent))
    # Without a tokenizer (a preset model): about four characters a token, said so.
    assert main(["simulate", "--trace", str(path), "--qps", "4"]) == 0
    assert "12 of 13 ShareGPT-style conversations (no --tokenizer: 4 characters a token)" in capsys.readouterr().err
    one_line_error(capsys, ["simulate", "--trace", str(path)], "conversations have no arrival times: give --qps")
    one_line_error(
        capsys, ["simulate", "--trace", str(path), "--qps", "1", "--tokenizer", str(tmp_path)], "no tokenizer at"
    )
