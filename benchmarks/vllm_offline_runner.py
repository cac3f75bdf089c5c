"""Benchmark vLLM offline generation on a local model folder.

Standalone: run it with the vLLM virtual environment's python (it imports only
vllm and the standard library), e.g.::

    /opt/vllm-venv/bin/python benchmarks/vllm_offline_runner.py \\
        --model /tmp/vllm_test_model --workload workload.json --out result.json \\
        --dtype bfloat16 --max-model-len 2048

The workload file is ``{"requests": [{"prompt_token_ids": [...], "max_tokens": N}, ...]}``.
Every request is decoded greedily with ``ignore_eos=True``, so each one yields
exactly ``max_tokens`` tokens.

Timing: after the engine is built, a 1-token generate of the first request
gives ``first_token_s_since_start`` (seconds from process start, or from
``--t0`` if the parent passes its own start time). The full workload then runs
in one ``LLM.generate`` call, timed as ``generate_s``.
"""

from __future__ import annotations

import time

_PROCESS_START = time.time()  # before any heavy import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local model folder")
    p.add_argument("--workload", required=True, help="workload JSON file")
    p.add_argument("--out", required=True, help="where to write the result JSON")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--t0",
        type=float,
        default=None,
        help="process-start time (time.time()) from the parent; default: this process's",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no torch.compile (vLLM's default compiles the model, also on CPU)",
    )
    p.add_argument(
        "--kv-cache-gb",
        type=int,
        default=4,
        help="VLLM_CPU_KVCACHE_SPACE if not already set in the environment",
    )
    p.add_argument(
        "--cpu-bind",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND if not already set, e.g. '0-1' to use both cores "
        "(vLLM's default 'auto' reserves one core for its front end)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed rounds; the best is reported")
    return p.parse_args(argv)


def load_workload(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        requests = json.load(f)["requests"]
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = args.t0 if args.t0 is not None else _PROCESS_START
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gb))
    if args.cpu_bind:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", args.cpu_bind)
    requests = load_workload(args.workload)

    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    t_load = time.time()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    load_s = time.time() - t_load

    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)

    prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_token_ids"])) for r in requests]

    # Time to first token: one 1-token request right after load.
    llm.generate([prompts[0]], params(1), use_tqdm=False)
    first_token_s = time.time() - t0

    # Best of --repeats rounds (the machines are shared and noisy); the prefix cache is emptied before
    # each round so that no round reuses an earlier one's prompts.
    times = []
    for _ in range(args.repeats):
        llm.reset_prefix_cache()
        t_gen = time.time()
        outputs = llm.generate(prompts, [params(int(r["max_tokens"])) for r in requests], use_tqdm=False)
        times.append(time.time() - t_gen)
    generate_s = min(times)

    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    prompt_tokens = sum(len(o.prompt_token_ids or []) for o in outputs)
    result = {
        "load_s": round(load_s, 3),
        "generate_s": round(generate_s, 3),
        "generate_s_all": [round(t, 3) for t in times],
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "num_requests": len(requests),
        "output_tok_per_s": round(output_tokens / generate_s, 3) if generate_s > 0 else None,
        "first_token_s_since_start": round(first_token_s, 3),
        "enforce_eager": args.enforce_eager,
        "cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "vllm_version": vllm.__version__,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
