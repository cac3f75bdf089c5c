"""`quanta bench serve`: replay a workload against any OpenAI-compatible server and report what
`vllm bench serve` reports (throughput, TTFT/TPOT/ITL/E2E, goodput), overall and per tenant.

Only standard fields are sent (plus `ignore_eos`, which vLLM and quanta accept), streaming, with
`stream_options.include_usage` so output token counts come from the server. Prompts of a given length
are token-id lists, which the completions API accepts, so no tokenizer is needed on this side.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from quanta.metrics import RequestMetrics, json_safe, summarize
from quanta.sim import workload as wl
from quanta.sim.conversations import load_tokenizer, read_conversations, sample_conversations


@dataclass(slots=True)
class BenchRequest:
    arrival: float  # seconds after the start
    prompt: str | list[int]
    prompt_len: int
    output_len: int
    tenant: str = "default"


@dataclass(slots=True)
class BenchResult:
    index: int
    tenant: str
    ok: bool
    error: str | None
    sent: float  # seconds after the start
    prompt_len: int
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)

    def metrics(self) -> RequestMetrics:
        n = self.output_tokens
        tpot = None
        if self.ttft is not None and self.e2e is not None and n > 1:
            tpot = (self.e2e - self.ttft) / (n - 1)
        return RequestMetrics(
            str(self.index),
            self.tenant,
            self.sent,
            self.prompt_len,
            n,
            self.ttft,
            self.e2e,
            tpot,
            None,
            self.itl,
        )


# ---- workloads ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)  # the workload and the token count read the same file once
def _vocab_size(tokenizer: str | None) -> tuple[int, Any]:
    if tokenizer is None:
        return 500, None  # ids every tokenizer has (quanta's tiny test model has 512)
    tok = load_tokenizer(tokenizer)
    return tok.get_vocab_size(), tok


def _random_ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    # Start above the usual special-token ids; distinct random ids avoid accidental prefix sharing.
    return rng.integers(min(10, vocab - 1), vocab, n).tolist()


def _hash_block_ids(hash_ids: tuple[int, ...], n: int, vocab: int, seed: int) -> list[int]:
    """A prompt of n tokens made of a trace's named blocks (Mooncake's hash_ids, HASH_BLOCK_TOKENS each):
    each block's tokens are random ids drawn from its id alone, so requests naming the same blocks send
    the same prefix (the server's prefix cache sees the trace's sharing), and the others share nothing."""
    b = wl.HASH_BLOCK_TOKENS
    out: list[int] = []
    for h in hash_ids[: -(-n // b)]:
        out += _random_ids(np.random.default_rng([seed, h & (2**63 - 1)]), b, vocab)
    return out[:n]


def check_args(args: argparse.Namespace) -> None:
    """Settings that would crash the run or silently mean something else: one-line errors."""
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.input_len < 1 or (args.output_len is not None and args.output_len < 1):
        raise ValueError("--input-len and --output-len must be at least 1")
    if not (0 < args.burstiness < math.inf):
        raise ValueError("--burstiness must be a positive number (1: Poisson)")
    if args.request_rate is not None and not args.request_rate > 0:
        raise ValueError("--request-rate must be positive (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError("--max-model-len must be at least 2 (a prompt token and an output token)")
    if args.tenants is not None and not all(t.strip() for t in args.tenants.split(",")):
        raise ValueError("--tenants takes comma-separated non-empty names")


def build_workload(args: argparse.Namespace) -> list[BenchRequest]:
    check_args(args)
    rng = np.random.default_rng(args.seed)
    vocab, tok = _vocab_size(args.tokenizer)
    chat = "chat" in getattr(args, "endpoint", "")
    n = args.num_prompts
    tenants = [t.strip() for t in args.tenants.split(",")] if args.tenants else None
    rate = args.request_rate
    cv = 1.0 / math.sqrt(args.burstiness)
    draw_rate = None if rate is None or math.isinf(rate) else rate
    spec = args.workload
    path = Path(spec)
    trace_arrivals = False
    if spec == "random":
        r = args.range_ratio
        lo_p, hi_p = max(1, int(args.input_len * (1 - r))), max(1, int(args.input_len * (1 + r)))
        out_len = 64 if args.output_len is None else args.output_len
        lo_o, hi_o = max(1, int(out_len * (1 - r))), max(1, int(out_len * (1 + r)))
        reqs = wl.synthetic(
            n, wl.LengthDist("uniform", lo_p, hi_p), wl.LengthDist("uniform", lo_o, hi_o), draw_rate, cv,
            args.seed, args.max_model_len,
        )  # fmt: skip
        rows = [(None, w.prompt_len, w.output_len, w.arrival, w.tenant, ()) for w in reqs]
    elif spec in wl.PRESETS:
        reqs = wl.preset(spec, n, draw_rate, cv, args.seed, args.max_model_len)
        rows = [(None, w.prompt_len, w.output_len, w.arrival, w.tenant, ()) for w in reqs]
    elif (data := read_conversations(path)) is not None:
        conv = sample_conversations(data, path, n, tok, rng, args.output_len, args.max_model_len)
        arrivals = wl.gamma_arrivals(draw_rate, cv, len(conv), rng) if draw_rate else np.zeros(len(conv))
        rows = [(p, pl, ol, float(a), "default", ()) for (p, pl, ol), a in zip(conv, arrivals)]
    else:
        try:
            reqs = wl.read_trace(path, num_requests=n)  # its own arrivals
        except ValueError as e:
            if "no arrival times" not in str(e):
                raise
            reqs = wl.read_trace(path, rate=1.0, num_requests=n)  # arrivals drawn below (or all at once)
            rate = math.inf if rate is None else rate
        trace_arrivals = rate is None
        if not trace_arrivals:
            arrivals = wl.gamma_arrivals(draw_rate, cv, len(reqs), rng) if draw_rate else np.zeros(len(reqs))
            reqs = [replace(w, arrival=float(a)) for w, a in zip(reqs, arrivals)]
        start = reqs[0].arrival if reqs else 0.0
        rows = [(None, w.prompt_len, w.output_len, w.arrival - start, w.tenant, w.hash_ids) for w in reqs]
    out = []
    for i, (text, p_len, o_len, arrival, tenant, hash_ids) in enumerate(rows):
        if args.max_model_len is not None:
            p_len = min(p_len, args.max_model_len - 1)
            o_len = max(1, min(o_len, args.max_model_len - p_len))
        prompt: str | list[int]
        if text is not None:
            prompt = text
        elif hash_ids:
            prompt = _hash_block_ids(hash_ids, p_len, vocab, args.seed)
        else:
            prompt = _random_ids(rng, p_len, vocab)
        if chat and not isinstance(prompt, str):
            if tok is None:
                raise ValueError(
                    "the chat endpoint takes text: give --tokenizer (the model's folder) so that prompts of "
                    "the asked lengths can be written, or use /v1/completions"
                )
            prompt = tok.decode(prompt)  # about p_len tokens of text, as vLLM's random prompts
        if tenants:
            tenant = tenants[i % len(tenants)]
        out.append(BenchRequest(arrival, prompt, p_len, o_len, tenant))
    return out


# ---- sending --------------------------------------------------------------------------------------
async def _send(
    session: Any,
    url: str,
    body: dict,
    headers: dict,
    result: BenchResult,
    t0: float,
    count_tokens: Callable[[str], int] | None = None,
) -> BenchResult:
    """One streamed request, timed as vLLM's benchmark times it: on the completions API every chunk with
    a choice is a token event (its text may be empty: a special token); on the chat API the chunks
    carrying content (or reasoning). Output tokens: the server's usage, else the text re-tokenized
    (`count_tokens`), else the events that carried text."""
    start = time.perf_counter()
    result.sent = start - t0
    last = None
    chunks = 0
    text_out: list[str] = []
    usage_tokens = None
    chat = "messages" in body
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                result.ok, result.error = False, f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            buffer = b""
            async for data in resp.content.iter_any():
                buffer = (buffer + data).replace(b"\r\n", b"\n")  # SSE allows CRLF line ends
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            continue
                        obj = json.loads(payload)
                        if "error" in obj:
                            err = obj["error"]
                            raise RuntimeError(str(err.get("message") if isinstance(err, dict) else err))
                        if obj.get("usage"):
                            usage_tokens = obj["usage"].get("completion_tokens")
                        if not obj.get("choices"):
                            continue
                        choice = obj["choices"][0]
                        if chat:
                            delta = choice.get("delta") or {}
                            text = delta.get("content") or delta.get("reasoning_content") or ""
                            if not text:
                                continue  # the role's chunk, a finish-only chunk
                        else:
                            text = choice.get("text") or ""
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        chunks += bool(text)
                        text_out.append(text)
        result.e2e = time.perf_counter() - start
        if usage_tokens is not None:
            result.output_tokens = usage_tokens
        elif count_tokens is not None:
            result.output_tokens = count_tokens("".join(text_out))
        else:
            result.output_tokens = chunks
        result.ok = result.ttft is not None
        if not result.ok:
            result.error = "no output"
    except Exception as e:  # a failed request is counted, not fatal
        result.ok, result.error = False, f"{type(e).__name__}: {e}"
    return result


async def run_bench(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    *,
    endpoint: str = "/v1/completions",
    api_key: str | None = None,
    max_concurrency: int | None = None,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    progress: bool = True,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[list[BenchResult], float]:
    """Send every request at its arrival time; returns the results and the wall time of the run."""
    import aiohttp
    from tqdm.auto import tqdm

    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    chat = "chat" in endpoint
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, desc="requests", dynamic_ncols=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()

        async def one(i: int, r: BenchRequest) -> BenchResult:
            delay = r.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            body: dict[str, Any] = {
                "model": model,
                "max_tokens": r.output_len,
                "temperature": temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if chat:
                assert isinstance(r.prompt, str), "chat prompts are text (build_workload decodes them)"
                body["messages"] = [{"role": "user", "content": r.prompt}]
            else:
                body["prompt"] = r.prompt
            if ignore_eos:
                body["ignore_eos"] = True
            if r.tenant != "default":
                body["tenant"] = r.tenant  # quanta's scheduling tenant (vLLM ignores the extra field)
                body["user"] = r.tenant  # OpenAI's end-user id
            result = BenchResult(i, r.tenant, False, None, 0.0, r.prompt_len)
            if sem is None:
                await _send(session, url, body, headers, result, t0, count_tokens)
            else:
                async with sem:
                    await _send(session, url, body, headers, result, t0, count_tokens)
            bar.update(1)
            return result

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        wall = time.perf_counter() - t0
    bar.close()
    return list(results), wall


# ---- report ---------------------------------------------------------------------------------------
def parse_goodput(items: list[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] (milliseconds) -> {'ttft_slo': 0.5, 'tpot_slo': 0.05}."""
    names = {"ttft": "ttft_slo", "tpot": "tpot_slo", "e2el": "e2e_slo", "e2e": "e2e_slo"}
    out = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in names or not value:
            raise ValueError(f"--goodput takes KEY:MS with KEY in ttft, tpot, e2el; got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not (0 <= ms < math.inf):
            raise ValueError(f"--goodput {item!r}: the target must be a non-negative number of milliseconds")
        out[names[key]] = ms / 1000.0
    return out


def _over_the_run(results: list[BenchResult], wall: float, slos: dict[str, float]) -> dict:
    """The summary of `results`' completed requests, its rates over the benchmark's whole wall time as
    vLLM divides them (failed requests at either end take time, not requests), so tenants add up."""
    ok = [r for r in results if r.ok]
    metrics = [r.metrics() for r in ok]
    s = summarize(metrics, **slos).as_dict()
    out = sum(r.output_tokens for r in ok)
    rate = (lambda x: x / wall) if wall > 0 else (lambda x: float("nan"))
    s.update(
        duration=wall,
        request_throughput=rate(len(ok)),
        output_throughput=rate(out),
        total_token_throughput=rate(out + sum(r.prompt_len for r in ok)),
        goodput=rate(sum(m.meets(**slos) for m in metrics)) if slos else None,
        failed=len(results) - len(ok),
    )
    return s


def report(results: list[BenchResult], wall: float, slos: dict[str, float], label: str | None = None) -> dict:
    ok = [r for r in results if r.ok]
    tenants = sorted({r.tenant for r in results})
    by_tenant = (
        {t: _over_the_run([r for r in results if r.tenant == t], wall, slos) for t in tenants}
        if len(tenants) > 1
        else {}
    )
    return {
        "label": label,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "benchmark_duration": wall,
        "total_input_tokens": sum(r.prompt_len for r in ok),
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "slos": slos,
        "summary": _over_the_run(results, wall, slos),
        "per_tenant": by_tenant,
    }


def _ms(d: dict[str, float], key: str) -> str:
    v = d.get(key, float("nan"))
    return "-" if v is None or math.isnan(v) else f"{v * 1000:.1f}"


def print_report(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = rep["summary"]
    table = Table(title=f"Serving benchmark{' - ' + rep['label'] if rep['label'] else ''}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("Successful requests", f"{rep['completed']}"),
        ("Failed requests", f"{rep['failed']}"),
        ("Benchmark duration (s)", f"{rep['benchmark_duration']:.2f}"),
        ("Total input tokens", f"{rep['total_input_tokens']}"),
        ("Total generated tokens", f"{rep['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    if s["goodput"] is not None:
        rows.append(("Request goodput (req/s)", f"{s['goodput']:.2f}"))
    for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E latency", "e2e")):
        d = s[key]
        rows.append(
            (f"{name} mean / median / p99 (ms)", f"{_ms(d, 'mean')} / {_ms(d, 'p50')} / {_ms(d, 'p99')}")
        )
    for k, v in rows:
        table.add_row(k, v)
    console = Console()
    console.print(table)
    if rep["per_tenant"]:
        t = Table(title="Per tenant")
        for col in ("tenant", "requests", "out tok/s", "goodput", "TTFT p50/p99 ms", "TPOT p50/p99 ms"):
            t.add_column(col)
        for tenant, ts in rep["per_tenant"].items():
            t.add_row(
                tenant,
                str(ts["num_requests"]),
                f"{ts['output_throughput']:.1f}",
                "-" if ts["goodput"] is None else f"{ts['goodput']:.2f}",
                f"{_ms(ts['ttft'], 'p50')} / {_ms(ts['ttft'], 'p99')}",
                f"{_ms(ts['tpot'], 'p50')} / {_ms(ts['tpot'], 'p99')}",
            )
        console.print(t)
    if rep["errors"]:
        console.print(f"errors (first {len(rep['errors'])}): {rep['errors']}")


def plot(results: list[BenchResult], folder: str | Path) -> list[Path]:
    from quanta.sim.plots import pyplot, save_figure

    plt = pyplot()
    folder = Path(folder)
    ok = [r for r in results if r.ok]
    series = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "itl": [x for r in ok for x in r.itl],
        "e2e": [r.e2e for r in ok if r.e2e is not None],
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, (name, values) in zip(axes, series.items()):
        if values:
            xs = np.sort(np.asarray(values) * 1000)
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs))
        ax.set_xlabel(f"{name.upper()} (ms)")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    paths = [save_figure(fig, folder / "latency_cdf.png")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    timed = [r for r in ok if r.ttft is not None]  # send times and TTFTs of the same requests
    ax.scatter([r.sent for r in timed], [r.ttft * 1000 for r in timed], s=8)
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("TTFT (ms)")
    ax.grid(alpha=0.3)
    paths.append(save_figure(fig, folder / "ttft_over_time.png"))
    return paths


def run_programs_cli(args: argparse.Namespace) -> int:
    from quanta.bench.programs import program_report, run_programs
    from quanta.sim.programs import SHAPES, read_programs, synthetic_programs

    if args.programs in SHAPES:
        rate = args.request_rate if args.request_rate not in (None, float("inf")) else None
        programs = synthetic_programs(
            args.programs, args.num_prompts, rate, seed=args.seed, max_context=args.max_model_len or 32768
        )
    else:
        programs = read_programs(args.programs)
    vocab, _ = _vocab_size(args.tokenizer)
    source, results, wall = asyncio.run(
        run_programs(
            args.base_url,
            args.model,
            programs,
            vocab,
            api_key=args.api_key,
            temperature=args.temperature,
            ignore_eos=not args.no_ignore_eos,
        )
    )
    rep = program_report(source, results, wall)
    for k, v in rep.items():
        print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")
    if args.result_json:
        path = Path(args.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json_safe({**rep, "calls": [asdict(r) for r in results]})
        path.write_text(json.dumps(data, indent=1, default=str, allow_nan=False))
    return 0 if rep["completed_programs"] == rep["programs"] else 1


def run_cli(args: argparse.Namespace) -> int:
    if args.programs:
        return run_programs_cli(args)
    slos = parse_goodput(args.goodput)
    requests = build_workload(args)
    _, tok = _vocab_size(args.tokenizer)
    # A server that sends no usage: its text re-tokenized, as vLLM counts it (needs the tokenizer).
    count = (lambda text: len(tok.encode(text, add_special_tokens=False).ids)) if tok is not None else None
    results, wall = asyncio.run(
        run_bench(
            args.base_url,
            args.model,
            requests,
            endpoint=args.endpoint,
            api_key=args.api_key,
            max_concurrency=args.max_concurrency,
            temperature=args.temperature,
            ignore_eos=not args.no_ignore_eos,
            progress=not args.no_progress,
            count_tokens=count,
        )
    )
    rep = report(results, wall, slos, args.label)
    rep["config"] = {k: v for k, v in vars(args).items() if k != "func" and k != "api_key"}
    print_report(rep)
    if args.result_json:
        path = Path(args.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json_safe({**rep, "requests": [asdict(r) for r in results]})
        path.write_text(json.dumps(data, indent=1, default=str, allow_nan=False))
    if args.plots:
        for p in plot(results, args.plots):
            print(f"wrote {p}")
    return 0 if rep["completed"] else 1


__all__ = ["BenchRequest", "BenchResult", "build_workload", "report", "run_bench"]
