"""Time one Microsoft Vidur simulation run (baseline for the quanta simulator).

Run with the Vidur venv interpreter, e.g.::

    /opt/vidur-venv/bin/python benchmarks/vidur_runner.py \
        --num-requests 1000 --qps 4 --replicas 1 --out /tmp/vidur.json

Vidur (PyPI ``vidur`` 0.0.26) ships no profiling data: on first use it
downloads kernel profiles / predictions from the HuggingFace Hub
(``project-vajra/*`` datasets) and trains random-forest predictors. Without
Hub access the run fails; the JSON then records ``ok: false`` and the reason.
Wall time covers the whole subprocess, including predictor download/training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DEFAULT_TRACE = "/work/shared/traces/sharegpt_chat.csv"


def vidur_version() -> str:
    try:
        return version("vidur")
    except PackageNotFoundError:
        return "not installed"


def build_command(args: argparse.Namespace, out_dir: str) -> list[str]:
    """Vidur CLI: synthetic generator, trace lengths, Poisson arrivals."""
    return [
        sys.executable,
        "-m",
        "vidur.main",
        "--replica_config_model_name",
        args.model,
        "--replica_config_device",
        args.device,
        "--cluster_config_num_replicas",
        str(args.replicas),
        "--replica_scheduler_config_type",
        args.scheduler,
        "--request_generator_config_type",
        "synthetic",
        "--synthetic_request_generator_config_num_requests",
        str(args.num_requests),
        "--length_generator_config_type",
        "trace",
        "--trace_request_length_generator_config_trace_file",
        args.trace,
        "--interval_generator_config_type",
        "poisson",
        "--poisson_request_interval_generator_config_qps",
        str(args.qps),
        "--no-metrics_config_store_plots",
        "--metrics_config_output_dir",
        out_dir,
    ]


def diagnose(returncode: int, log: str) -> str:
    if returncode == 0:
        return "simulation completed"
    if "LocalEntryNotFoundError" in log or "huggingface" in log.lower():
        return (
            "failed: Vidur fetches profiling data/predictions from the "
            "HuggingFace Hub (project-vajra datasets), which is unreachable; "
            "the package bundles no profiling CSVs"
        )
    tail = log.strip().splitlines()[-1:] or ["<no output>"]
    return f"failed (rc={returncode}): {tail[0][:300]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, required=True)
    p.add_argument("--qps", type=float, default=4.0)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="meta-llama/Llama-3-8B")
    p.add_argument("--device", default="h100", choices=["h100", "a100"])
    p.add_argument("--scheduler", default="sarathi", choices=["sarathi", "vllm"])
    p.add_argument(
        "--trace", default=DEFAULT_TRACE, help="CSV with num_prefill_tokens,num_decode_tokens columns"
    )
    p.add_argument("--timeout", type=float, default=3600.0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="vidur_") as tmp:
        cmd = build_command(args, tmp)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=args.timeout)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            rc, log = -1, f"timed out after {args.timeout}s"
        wall = time.perf_counter() - start

    result = {
        "num_requests": args.num_requests,
        "replicas": args.replicas,
        "qps": args.qps,
        "wall_seconds": round(wall, 3),
        "vidur_version": vidur_version(),
        "ok": rc == 0,
        "notes": diagnose(rc, log),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    sys.exit(0 if rc == 0 else 1)


if __name__ == "__main__":
    main()
