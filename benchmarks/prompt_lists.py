"""A list of prompts in one /v1/completions request against the same prompts sent as concurrent requests,
on one `quanta serve` (tiny random-weight Llama, CPU), in one run.

Evaluation harnesses and batch clients send many prompts per request; those must enter the scheduler
together, so one request of N prompts should take about as long as N concurrent requests (the target: at
most 2x). Each prompt is --prompt-len random token ids with --max-tokens forced output tokens. The modes
alternate for --rounds rounds and each keeps its best. Prints a table and writes JSON.

    python benchmarks/prompt_lists.py [--prompts 100 1000] [--rounds 2] [--out results/prompt_lists.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_load import free_port, wait_healthy

NAME = "tiny"


async def timed(url: str, mode: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one mode; a client of its own per event loop."""
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        run = one_request if mode == "one request" else concurrent
        tokens = await run(client, prompts, max_tokens)
        return time.perf_counter() - t0, tokens


async def one_request(client, prompts: list[list[int]], max_tokens: int) -> int:
    out = await client.completions.create(
        model=NAME, prompt=prompts, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.usage.completion_tokens


async def concurrent(client, prompts: list[list[int]], max_tokens: int) -> int:
    outs = await asyncio.gather(*(one_request(client, [p], max_tokens) for p in prompts))
    return sum(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="results/prompt_lists.json")
    args = ap.parse_args()
    from quanta.model.make_model import make_model

    workdir = Path(tempfile.mkdtemp())
    model = make_model(workdir / "tiny", "tiny-llama")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "quanta.cli", "serve", "--model", str(model), "--port", str(port),
           "--served-model-name", NAME, "--max-num-seqs", "256", "--max-num-batched-tokens", "2048",
           "--max-model-len", "256"]  # fmt: skip
    log = (workdir / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_healthy(proc, url, 300)
        rng = random.Random(0)
        for n in args.prompts:
            prompts = [[rng.randrange(3, 500) for _ in range(args.prompt_len)] for _ in range(n)]
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for mode in ("one request", "concurrent requests"):
                    seconds, tokens = asyncio.run(timed(url, mode, prompts, args.max_tokens))
                    assert tokens == n * args.max_tokens, (mode, tokens)
                    best[mode] = min(best.get(mode, float("inf")), seconds)
            rows.append(
                {
                    "prompts": n,
                    "one_request_s": best["one request"],
                    "concurrent_s": best["concurrent requests"],
                    "ratio": best["one request"] / best["concurrent requests"],
                }
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"{'prompts':>8} {'one request s':>14} {'concurrent s':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['prompts']:>8} {r['one_request_s']:>14.2f} {r['concurrent_s']:>13.2f} {r['ratio']:>6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
