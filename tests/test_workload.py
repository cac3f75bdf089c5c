"""Workload generators' statistics and the trace file format (tests make their own data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quanta.sim.workload import (
    EOS_TOKEN_ID,
    LengthDist,
    TraceInfo,
    WorkloadRequest,
    gamma_arrivals,
    head,
    output_lengths,
    poisson_arrivals,
    preset,
    prompt_token_ids,
    read_trace,
    scale_rate,
    to_requests,
    write_trace,
)


def test_arrival_processes_have_the_asked_rate_and_burstiness() -> None:
    rng = np.random.default_rng(0)
    t = poisson_arrivals(4.0, 40_000, rng)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    bursty = np.diff(gamma_arrivals(4.0, 3.0, 40_000, rng))
    assert bursty.mean() == pytest.approx(0.25, rel=0.08)
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError):
        gamma_arrivals(0.0, 1.0, 3, rng)


def test_length_distributions() -> None:
    rng = np.random.default_rng(1)
    x = LengthDist("lognormal", 1730, 5696).sample(rng, 50_000)
    assert np.median(x) == pytest.approx(1730, rel=0.03)
    assert np.percentile(x, 90) == pytest.approx(5696, rel=0.05)
    u = LengthDist("uniform", 32, 256).sample(rng, 10_000)
    assert u.min() >= 32 and u.max() <= 256 and u.mean() == pytest.approx(144, rel=0.03)
    z = LengthDist("zipf", 1.2, 0, low=1, high=1000).sample(rng, 20_000)
    assert z.min() >= 1 and z.max() <= 1000 and (z == 1).mean() > (z == 2).mean() > (z == 10).mean()
    with pytest.raises(ValueError, match="unknown length distribution"):
        LengthDist("pareto", 1, 2).sample(rng, 1)


def test_presets_match_published_medians() -> None:
    w = preset("sharegpt", 40_000, rate=2.0, seed=3, max_total=8192)
    prompts = np.array([r.prompt_len for r in w])
    outputs = np.array([r.output_len for r in w])
    assert np.median(prompts) == pytest.approx(1730, rel=0.05)
    assert np.median(outputs) == pytest.approx(415, rel=0.05)
    assert all(r.prompt_len + r.output_len <= 8192 for r in w)
    assert w[-1].arrival / len(w) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="unknown workload preset"):
        preset("nope", 1, 1.0)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_trace_round_trip_and_errors(tmp_path: Path, suffix: str) -> None:
    reqs = [
        WorkloadRequest(0.0, 10, 5, tenant="a", priority=1, deadline=2.0, session_id="s1"),
        WorkloadRequest(0.5, 20, 7),
        WorkloadRequest(0.6, 40, 30, max_tokens=12, prefix_group="sys", prefix_len=32),
        WorkloadRequest(0.7, 50, 7, prefix_group="sys", prefix_len=32, session_id="s"),
    ]
    path = tmp_path / f"t{suffix}"
    write_trace(path, reqs)
    assert read_trace(path) == reqs
    # Public-trace column names, no arrivals: drawn at the given rate.
    bare = tmp_path / "bare.csv"
    bare.write_text("num_prefill_tokens,num_decode_tokens\n100,20\n200,30\n300,40\n")
    with pytest.raises(ValueError, match="no arrival times"):
        read_trace(bare)
    drawn = read_trace(bare, rate=10.0)
    assert [r.prompt_len for r in drawn] == [100, 200, 300] and drawn[0].arrival == 0.0
    broken = tmp_path / "broken.csv"
    broken.write_text("prompt_len,output_len\n10,x\n")
    with pytest.raises(ValueError, match=r"broken\.csv:2"):
        read_trace(broken)
    with pytest.raises(ValueError, match="does not exist"):
        read_trace(tmp_path / "missing.csv")


def test_engine_requests_from_a_workload() -> None:
    w = [WorkloadRequest(1.0, 40, 9, tenant="t", deadline=3.0), WorkloadRequest(2.0, 40, 4)]
    reqs = to_requests(scale_rate(w, 2.0))
    assert [r.arrival_time for r in reqs] == [0.5, 1.0]
    assert reqs[0].deadline == pytest.approx(3.5) and reqs[0].tenant == "t"
    # As a client sends them: no max_tokens (the true length stays with the simulator), EOS honoured.
    assert reqs[0].sampling_params.max_tokens is None and not reqs[0].sampling_params.ignore_eos
    assert reqs[0].eos_token_ids == (EOS_TOKEN_ID,)
    assert output_lengths(w) == {"w0": 9, "w1": 4}
    assert reqs[0].prompt_token_ids[0] != reqs[1].prompt_token_ids[0]  # no accidental prefix sharing
    capped = to_requests(w + [WorkloadRequest(3.0, 40, 9, max_tokens=5)], default_max_tokens=64)
    assert [r.sampling_params.max_tokens for r in capped] == [64, 64, 5]


def test_trace_max_tokens_and_prefix_columns(tmp_path: Path) -> None:
    # (Their round trip through CSV and JSONL is in test_trace_round_trip_and_errors.)
    # Tables with missing values write integer columns as floats.
    floats = tmp_path / "floats.csv"
    floats.write_text("arrival,prompt_len,output_len,max_tokens\n0,10,5,12.0\n1,10,5,\n")
    assert [r.max_tokens for r in read_trace(floats)] == [12, None]
    for row, match in (
        ("0,10,5,0,,", "max_tokens must be at least 1"),
        ("0,10,5,,g,11", "prefix_len must be between 0 and prompt_len"),
        ("0,10,5,,,4", "prefix_len needs a prefix_group"),
    ):
        bad = tmp_path / "bad.csv"
        bad.write_text(f"arrival,prompt_len,output_len,max_tokens,prefix_group,prefix_len\n{row}\n")
        with pytest.raises(ValueError, match=match):
            read_trace(bad)


def test_synthetic_prompts_share_what_the_trace_says() -> None:
    w = [
        WorkloadRequest(0.0, 100, 5, session_id="a"),
        WorkloadRequest(1.0, 180, 5, session_id="a"),  # the next turn: extends the first turn's prompt
        WorkloadRequest(0.0, 100, 5, session_id="b"),
        WorkloadRequest(0.0, 90, 5, prefix_group="sys", prefix_len=64),
        WorkloadRequest(0.0, 80, 5, prefix_group="sys", prefix_len=64),
        WorkloadRequest(0.0, 100, 5),
        WorkloadRequest(0.0, 100, 5),
    ]
    ids = prompt_token_ids(w)
    assert [len(x) for x in ids] == [r.prompt_len for r in w]
    assert ids[1][:100] == ids[0] and ids[1][100:] != ids[0][:80]
    assert ids[3][:64] == ids[4][:64]
    # Anything not shared differs at every position, so no block hash can match by accident.
    for a, b in ((ids[0], ids[2]), (ids[3][64:], ids[4][64:]), (ids[5], ids[6]), (ids[0], ids[5])):
        assert all(x != y for x, y in zip(a, b))
    flat = [t for x in ids for t in x]
    assert min(flat) > max(EOS_TOKEN_ID, 0) and max(flat) < 2**20
    assert prompt_token_ids(w) == ids  # deterministic
    # A prefix_len longer than the prompt (hand-made rows, not read from a trace) shares the whole prompt.
    short = prompt_token_ids([WorkloadRequest(0.0, 8, 1, prefix_group="g", prefix_len=20)] * 2)
    assert short[0] == short[1] and len(short[0]) == 8


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("arrival,prompt_len,output_len\nnan,10,5\n", "not a finite number"),
        ("arrival,prompt_len,output_len\ninf,10,5\n", "not a finite number"),
        ("arrival,prompt_len,output_len\n0,1e400,5\n", "not a finite number"),
        ("arrival,prompt_len,output_len\n0,10.7,5\n", "not a whole number"),
        ("arrival,prompt_len,output_len,deadline\n0,10,5,-1\n", "deadline"),
        # One blank arrival cell: an error naming the request, not a reason to redraw every arrival.
        ("arrival,prompt_len,output_len\n0,10,5\n,10,5\n2,10,5\n", "request 2 has no arrival time"),
    ],
)
def test_trace_cells_that_are_not_values_are_errors(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=match):
        read_trace(path, rate=1.0)


def test_trace_from_a_spreadsheet_and_json_that_is_not_rows(tmp_path: Path) -> None:
    # A spreadsheet's "CSV UTF-8" starts with a byte-order mark: the first column is still found.
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffarrived_at,num_prefill_tokens,num_decode_tokens\r\n0.5,10,5\r\n1.5,20,6\r\n".encode())
    assert [(r.arrival, r.prompt_len) for r in read_trace(bom)] == [(0.5, 10), (1.5, 20)]
    array = tmp_path / "t.jsonl"
    array.write_text('[{"arrival": 0, "prompt_len": 10, "output_len": 5}]\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:1: a request must be an object"):
        read_trace(array)


def test_public_trace_formats_read_as_they_are(tmp_path: Path) -> None:
    from quanta.sim.workload import TraceInfo

    # Azure LLM inference 2023/2024: absolute times in 100 ns digits, counted from the earliest row.
    azure = tmp_path / "AzureLLMInferenceTrace_code.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,4808,10\n"
        "2023-11-16 18:15:50.9951690,3180,8\n"
        "2023-11-16 18:15:46.1805900,110,0\n"  # out of order, and a request that generated nothing
    )
    info = TraceInfo()
    w = read_trace(azure, info=info)
    assert info.format == "Azure LLM inference" and info.zero_outputs == 1
    assert [(r.prompt_len, r.output_len) for r in w] == [(110, 1), (4808, 10), (3180, 8)]
    assert [r.arrival for r in w] == pytest.approx([0.0, 0.5, 4.814579])
    # BurstGPT: seconds, extra columns ignored.
    burst = tmp_path / "BurstGPT_1.csv"
    burst.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n45,GPT-4,1087,0,1087,Conversation log\n"
    )
    w = read_trace(burst, info=info)
    assert info.format == "BurstGPT" and info.zero_outputs == 1
    assert [(r.arrival, r.prompt_len, r.output_len) for r in w] == [(5.0, 472, 18), (45.0, 1087, 1)]
    # Mooncake: milliseconds, and blocks named by hash id.
    moon = tmp_path / "mooncake_trace.jsonl"
    moon.write_text(
        '{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8, 9]}\n'
        '{"timestamp": 2500, "input_length": 600, "output_length": 3, "hash_ids": [7, 10]}\n'
        '{"timestamp": 3000, "input_length": 512, "output_length": 3, "hash_ids": [11]}\n'
    )
    w = read_trace(moon, info=info)
    assert info.format == "Mooncake" and info.zero_outputs == 0
    assert [r.arrival for r in w] == [0.0, 2.5, 3.0] and w[1].hash_ids == (7, 10)
    ids = prompt_token_ids(w)
    assert [len(x) for x in ids] == [1100, 600, 512]
    assert ids[0][:512] == ids[1][:512]  # block 7 is shared
    assert all(x != y for x, y in zip(ids[0][512:], ids[1][512:]))  # 8 and 10 are not
    assert all(x != y for x, y in zip(ids[0], ids[2]))
    # Round trip of hash_ids through both of quanta's formats.
    for suffix in (".csv", ".jsonl"):
        path = tmp_path / f"moon{suffix}"
        write_trace(path, w)
        assert read_trace(path) == w
    for row, match in (
        ('{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8]}', "cover at most 1024"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": ["a"]}', "list of integers"),
        ('{"timestamp": 0, "input_length": 10, "output_length": -1}', "output_len at least 0"),
    ):
        moon.write_text(row + "\n")
        with pytest.raises(ValueError, match=match):
            read_trace(moon)
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,10,5\n")
    with pytest.raises(ValueError, match=r"code\.csv:2: 'yesterday' is not a date and time"):
        read_trace(azure)


def test_a_trace_of_hash_ids_hits_the_prefix_cache_where_it_says() -> None:
    from quanta.sim.hardware import get_gpu
    from quanta.sim.model_presets import get_model
    from quanta.sim.simulation import SimConfig, simulate

    # Four requests over one shared block, then one of its own: 3 x 32 shared blocks of 16 tokens hit.
    w = [WorkloadRequest(float(i), 700, 4, hash_ids=(1, 2 + i)) for i in range(4)]
    w.append(WorkloadRequest(10.0, 700, 4, hash_ids=(99, 100)))
    res = simulate(w, SimConfig(get_model("llama-3.1-8b"), get_gpu("a100-80gb")))
    assert res.prefix_cache_hits == 3 * 512 // 16
    assert res.summary().num_requests == 5 and all(r.num_output_tokens == 4 for r in res.requests)


def test_traces_as_downloaded_compressed_or_saved_as_a_json_list(tmp_path: Path) -> None:
    import gzip
    import json

    from quanta.sim.workload import TraceInfo

    # BurstGPT, gzip-compressed (the name says so), Windows line endings, a trailing blank line.
    burst = tmp_path / "BurstGPT_1.csv.gz"
    burst.write_bytes(
        gzip.compress(
            b"Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\r\n"
            b"5,ChatGPT,472,18,490,Conversation log\r\n45,GPT-4,1087,0,1087,API log\r\n\r\n"
        )
    )
    info = TraceInfo()
    assert [(r.arrival, r.prompt_len, r.output_len) for r in read_trace(burst, info=info)] == [
        (5.0, 472, 18),
        (45.0, 1087, 1),
    ]
    assert info.format == "BurstGPT" and info.zero_outputs == 1
    # Mooncake JSONL compressed under a name that does not say so; its ids written as strings of digits.
    rows = [
        {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": ["7", "8"]},
        {"timestamp": 1500, "input_length": 700, "output_length": 3, "hash_ids": [7, 9]},
    ]
    moon = tmp_path / "mooncake_trace.jsonl"
    moon.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    w = read_trace(moon, info=info)
    assert info.format == "Mooncake" and [r.arrival for r in w] == [0.0, 1.5]
    assert [r.hash_ids for r in w] == [(7, 8), (7, 9)]
    # The same rows as one JSON list in a .json file, and as JSON lines in a .json file.
    listed = tmp_path / "mooncake_trace.json"
    listed.write_text(json.dumps(rows, indent=1))
    assert read_trace(listed) == w
    listed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_trace(listed) == w


def test_files_that_are_no_trace_are_one_line_errors(tmp_path: Path) -> None:
    import gzip
    import json

    binary = tmp_path / "trace.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"trace\.csv' is not a CSV or JSONL text file"):
        read_trace(binary)
    other = tmp_path / "people.csv"
    other.write_text("name,age\nbob,3\n")
    with pytest.raises(ValueError, match=r"columns 'name', 'age' are no trace format .* Mooncake's"):
        read_trace(other)
    cut = tmp_path / "BurstGPT_1.csv.gz"
    whole = gzip.compress(b"Timestamp,Model,Request tokens,Response tokens\n" + b"5,m,10,3\n" * 500)
    cut.write_bytes(whole[:-20])
    with pytest.raises(ValueError, match="a damaged gzip file"):
        read_trace(cut)
    # Where a bad row is: its line in the file, past blank lines and quoted line breaks.
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt_len,output_len,tenant\n10,5,a\n\n10,5,"two\nlines"\n10,x,a\n')
    with pytest.raises(ValueError, match=r"bad\.csv:6: .*'x'"):
        read_trace(bad)
    huge = tmp_path / "huge.jsonl"
    ids = [*range(1000), "a"]
    huge.write_text(json.dumps({"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": ids}))
    # The row's ids are cut in the message (one readable line), the one that is no integer named.
    with pytest.raises(ValueError, match=r"hash_ids \[0, 1, 2, [^\n]{0,70}\] is not a list of integers \('a'\)$"):
        read_trace(huge)


def test_azure_timestamps_as_written_by_other_tools(tmp_path: Path) -> None:
    # Azure 2024's "+00:00", a "Z", no fraction, 5 or 7 fractional digits (Python 3.10's fromisoformat reads
    # none of the last three): the same instants, counted from the earliest.
    azure = tmp_path / "AzureLLMInferenceTrace_conv_1week.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00+00:00,10,1\n2024-05-10T00:00:01Z,10,1\n2024-05-10 00:00:02.50000,10,1\n"
        "2024-05-10 00:00:03.2500000+00:00,10,1\n2024-05-10 00:00:04,10,1\n"
    )
    assert [r.arrival for r in read_trace(azure)] == [0.0, 1.0, 2.5, 3.25, 4.0]


def test_public_trace_rows_without_a_prompt_are_left_out_and_long_hash_id_cells_read(tmp_path: Path) -> None:
    from quanta.sim.workload import TraceInfo

    # BurstGPT logs failed requests too: a row of 0 request tokens sent nothing, so there is nothing to serve.
    burst = tmp_path / "BurstGPT_1.csv"
    burst.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n7,ChatGPT,0,0,0,Conversation log\n9,GPT-4,30,2,32,API log\n"
    )
    info = TraceInfo()
    w = read_trace(burst, info=info)
    assert info.empty_prompts == 1 and [(r.arrival, r.prompt_len) for r in w] == [(5.0, 472), (9.0, 30)]
    burst.write_text("Timestamp,Model,Request tokens,Response tokens\n7,ChatGPT,0,0\n")
    with pytest.raises(ValueError, match=r"has no requests \(its 1 rows have 0 prompt tokens\)"):
        read_trace(burst)
    # In quanta's own columns a prompt of 0 tokens is a mistake in the file, said with its line.
    own = tmp_path / "t.csv"
    own.write_text("arrival,prompt_len,output_len\n0,0,5\n")
    with pytest.raises(ValueError, match=r"t\.csv:2: prompt_len must be at least 1"):
        read_trace(own)
    # A long prompt's hash ids outgrow the csv module's default field limit (131,072 characters).
    ids = list(range(10**12, 10**12 + 12_000))
    w = [WorkloadRequest(0.0, len(ids) * 512, 3, hash_ids=tuple(ids))]
    write_trace(own, w)
    assert len(own.read_text()) > 131_072 and read_trace(own) == w


@pytest.mark.parametrize("fmt", ["quanta", "azure"])
def test_reading_a_trace_s_head_keeps_no_more_and_equals_the_head_of_the_whole(tmp_path: Path, fmt: str) -> None:
    from datetime import datetime, timedelta

    rng = np.random.default_rng(5)
    n = 3000
    # Out of order in places, with ties: what head() of the whole trace returns is the reference.
    arrivals = np.round(np.sort(rng.uniform(0, 600, n)), 1)
    arrivals[rng.choice(n, 200, replace=False)] = np.round(rng.uniform(0, 600, 200), 1)
    path = tmp_path / f"t_{fmt}.csv"
    if fmt == "azure":
        t0 = datetime(2024, 5, 10, 0, 0, 0)
        stamps = [(t0 + timedelta(seconds=float(a))).isoformat(sep=" ") for a in arrivals]
        rows = [f"{t},{i + 1},{i % 7}" for i, t in enumerate(stamps)]
        path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    else:
        rows = [f"{a},{i + 1},{i % 7 + 1}" for i, a in enumerate(arrivals)]
        path.write_text("arrival,prompt_len,output_len\n" + "\n".join(rows) + "\n")
    whole = read_trace(path)
    for num_requests, duration in ((None, None), (1, None), (500, None), (None, 0.05), (None, 45.0), (40, 45.0),
                                   (900, 30.0), (n + 5, None), (None, 1e6)):  # fmt: skip
        info = TraceInfo()
        got = read_trace(path, info=info, num_requests=num_requests, duration=duration)
        assert got == head(whole, num_requests, duration), (num_requests, duration)
        assert info.zero_outputs == (sum(r.prompt_len % 7 == 1 for r in got) if fmt == "azure" else 0)
    # Every row is still read and checked, the ones past the head too.
    path.write_text(path.read_text() + "later,5,5\n")
    with pytest.raises(ValueError, match=f"t_{fmt}.csv:{n + 2}:"):
        read_trace(path, num_requests=10)
    # Rows without arrivals: drawn at the rate, then cut the same way.
    path.write_text("prompt_len,output_len\n" + "".join(f"{i + 1},3\n" for i in range(50)))
    drawn = read_trace(path, rate=2.0, num_requests=20, duration=5.0)
    assert drawn == head(read_trace(path, rate=2.0), 20, 5.0) and drawn
    path.write_text("arrival,prompt_len,output_len\n1,5,5\n,6,6\n2,7,7\n")
    with pytest.raises(ValueError, match="request 2 has no arrival time"):
        read_trace(path, duration=10.0)
    with pytest.raises(ValueError, match="duration must be positive"):
        read_trace(path, duration=0.0)


def test_conversations_are_counted_in_batches_as_one_by_one() -> None:
    """sample_conversations counts tokens a batch at a time: the same rows as counting each text alone, in
    the same order, whatever falls across a batch boundary, with a length cap leaving some out."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from quanta.sim.conversations import sample_conversations

    vocab = {w: i for i, w in enumerate(["[UNK]", *"abcdefgh"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rng = np.random.default_rng(0)

    def text() -> str:
        return " ".join(rng.choice(list("abcdefghxyz"), size=int(rng.integers(1, 40))))

    data = [{"conversations": [{"value": text()}, {"value": text()}]} for _ in range(700)]
    for n, max_len in ((None, None), (650, 50), (100, 30), (5, None)):
        got = sample_conversations(data, Path("c.json"), n, tok, np.random.default_rng(1), max_len=max_len)
        expected = []
        for i in np.random.default_rng(1).permutation(len(data)):
            prompt, answer = (t["value"] for t in data[int(i)]["conversations"])
            p_len, o_len = max(1, len(tok.encode(prompt).ids)), max(1, len(tok.encode(answer).ids))
            if (max_len is None or p_len + o_len <= max_len) and len(expected) != n:
                expected.append((prompt, p_len, o_len))
        assert got == expected
        assert len(got) == (n or 700) if max_len is None else 0 < len(got) < 700
