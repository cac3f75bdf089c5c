"""quanta against quanta: offline throughput of two source trees, interleaved, on offline_throughput's workloads.

For iterating on CPU speed on a shared machine, where two runs minutes apart differ by 1.5-2x: every
round runs each variant in a fresh process, one after the other, and reports wall time and the
process's CPU time (user + system, all threads), which other jobs disturb less. The best round per
variant and the ratio against the first variant (the baseline) are printed and written as JSON.

    python benchmarks/quanta_ab.py --variant base=/tmp/base/src --variant new=src --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(model: str | None, threads: int, workloads: list[str]) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from offline_throughput import make_workloads
    from quanta import LLM, SamplingParams

    wl = make_workloads()
    llm = LLM(model, dtype="bfloat16", max_model_len=2048)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    out = {}
    for name in workloads:
        reqs = wl[name]
        params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True) for r in reqs]
        llm.reset_prefix_cache()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        outs = llm.generate([r["prompt_token_ids"] for r in reqs], params, use_tqdm=False)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        out[name] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "output_tokens": n,
            "first_tokens": [o.outputs[0].token_ids[:8] for o in outs[:4]],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="NAME=SRC_DIR (first one: baseline)")
    ap.add_argument("--model", default=None, help="default: quanta's default model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="a_32x128x128,b_48_mixed")
    ap.add_argument("--out", default="quanta_ab.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = args.workloads.split(",")
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args.model, args.threads, names)), flush=True)
        return
    variants = [v.split("=", 1) for v in args.variant]
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for rnd in range(args.rounds):
        for name, src in variants:
            env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), OMP_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, __file__, "--variant", "x=x", "--worker", "1", "--threads", str(args.threads)]
            cmd += ["--workloads", args.workloads] + (["--model", args.model] if args.model else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[len("RESULT ") :])
            results[name].append(res)
            print(
                f"round {rnd} {name:>8}: "
                + "  ".join(f"{w} wall {r['wall_s']:.2f}s cpu {r['cpu_s']:.2f}s" for w, r in res.items()),
                flush=True,
            )
    base = variants[0][0]
    summary: dict[str, dict] = {}
    print(f"\nbest of {args.rounds} rounds, {args.threads} thread(s); tok/s by wall time and by CPU time")
    print(f"{'variant':>10} {'workload':>14} {'tok/s wall':>11} {'tok/cpu-s':>10} {'x base wall':>12} {'x base cpu':>11}")
    for name, _ in variants:
        summary[name] = {}
        for w in names:
            n = results[name][0][w]["output_tokens"]
            wall = min(r[w]["wall_s"] for r in results[name])
            cpu = min(r[w]["cpu_s"] for r in results[name])
            bwall = min(r[w]["wall_s"] for r in results[base])
            bcpu = min(r[w]["cpu_s"] for r in results[base])
            same = results[name][0][w]["first_tokens"] == results[base][0][w]["first_tokens"]
            summary[name][w] = {
                "tok_s_wall": n / wall,
                "tok_s_cpu": n / cpu,
                "x_base_wall": bwall / wall,
                "x_base_cpu": bcpu / cpu,
                "same_tokens_as_base": same,
            }
            print(
                f"{name:>10} {w:>14} {n / wall:>11.0f} {n / cpu:>10.0f} {bwall / wall:>12.3f} {bcpu / cpu:>11.3f}"
                + ("" if same else "  (tokens differ from base)")
            )
    Path(args.out).write_text(
        json.dumps({"threads": args.threads, "rounds": args.rounds, "summary": summary, "raw": results}, indent=1)
    )


if __name__ == "__main__":
    main()
