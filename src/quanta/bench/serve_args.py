"""Arguments of `quanta bench serve` (kept apart from the load generator so `quanta --help` stays fast)."""

from __future__ import annotations

import argparse


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name the server serves")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--workload",
        default="random",
        help="'random' (--input-len/--output-len), a length preset (sharegpt, arxiv, azure-conv), "
        "a trace CSV/JSONL (prompt_len, output_len, optional arrival, tenant), "
        "or a ShareGPT-style JSON with real text",
    )
    p.add_argument(
        "--programs",
        default=None,
        help="agent programs in closed loop instead of --workload: a program trace JSONL, or a synthetic "
        "shape (swe, bfcl, short, long) with --num-prompts programs at --request-rate programs/s",
    )
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="random workload: prompt tokens")
    p.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="output tokens (random: default 64; ShareGPT: the answer's)",
    )
    p.add_argument("--range-ratio", type=float, default=0.0, help="random workload: lengths vary by +-ratio")
    p.add_argument("--max-model-len", type=int, default=None, help="clip prompt + output to this many tokens")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="model folder, tokenizer.json or GGUF file: its vocabulary for synthetic prompts, and token counts",
    )
    p.add_argument("--tenants", default=None, help="comma-separated tenants, assigned round-robin")
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="requests/s (inf: all at once); default: the trace's own arrivals, else inf",
    )
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--no-ignore-eos", action="store_true", help="do not send ignore_eos (for servers that reject it)"
    )
    p.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="KEY:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000 (milliseconds)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None, help="write the report (and per-request data) here")
    p.add_argument("--plots", default=None, help="folder for PNG plots (latency CDFs)")
    p.add_argument("--label", default=None, help="name of this run in the report")
    p.add_argument("--no-progress", action="store_true")
