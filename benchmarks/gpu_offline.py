"""Offline GPU benchmark: Llama-3.1-8B shape, random bf16 weights (built on the device, no download).

Reports, in one run on one GPU:
  * the card's measured ceilings: device-to-device copy bandwidth and a bf16 8192^3 matmul;
  * the 256-request job (prompts uniform in 128..1024 tokens, 128 forced output tokens): time and
    total tokens/s, for quanta and for `transformers` `generate_batch` (continuous batching, paged SDPA)
    as the baseline;
  * decode step time (whole engine step: schedule, inputs, graph replay, sampling) at batch 1, 32, 128
    against the floor of reading the weights once;
  * prefill throughput of a step of 8k prompt tokens as a fraction of the measured matmul peak.

Runs from the source tree with the machine's own torch (`PYTHONPATH=src python benchmarks/gpu_offline.py`).
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# For a dry run of the script's logic on a CPU (--shape tiny --device cpu): no figure of it means anything.
TINY = {
    **LLAMA_31_8B,
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SHAPES = {"llama-3.1-8b": LLAMA_31_8B, "tiny": TINY}


def make_folder(path: Path, shape: dict[str, Any]) -> Path:
    """config.json plus a two-token tokenizer: the job is token ids in, token ids out (no detokenizing)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig

    cfg = LlamaConfig(**shape)
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    Tokenizer(WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return path


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(10, vocab, (m,), generator=g).tolist() for m in lengths]


def measure_ceilings() -> dict[str, float]:
    import triton.testing

    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=100, rep=500, return_mode="median")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return {"copy_gbps": 2 * (2 << 30) / copy_ms / 1e6, "matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


def weight_bytes(shape: dict[str, Any]) -> int:
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return 2 * (layers * per_layer + 2 * shape["vocab_size"] * h + h)


def run_quanta(folder: Path, args: argparse.Namespace, res: dict[str, Any]) -> None:
    from quanta import LLM, SamplingParams

    cfg = SHAPES[args.shape]
    vocab = cfg["vocab_size"]
    t0 = time.time()
    llm = LLM(
        str(folder),
        device=args.device,
        dtype="bfloat16",
        load_format="dummy",
        max_model_len=2048,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=256,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    res["quanta_startup_s"] = time.time() - t0
    res["quanta_kv_blocks"] = llm.engine.executor.num_kv_blocks
    res["quanta_weight_bytes"] = weight_bytes(cfg)
    engine = llm.engine
    steps: list[tuple[int, int, float]] = []  # (batched tokens, requests, seconds)
    engine.core.step_observers.append(
        lambda out: steps.append((out.plan.num_batched_tokens, len(out.plan.scheduled), out.end - out.start))
    )

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    # Warm-up: kernels compile for prefill and mixed steps (decode graphs were captured at start-up).
    llm.generate(workload(8, 100, 600, vocab, seed=99), params(8), use_tqdm=False)

    prompts = workload(args.num_requests, 128, 1024, vocab, seed=0)
    steps.clear()
    start = time.perf_counter()
    outs = llm.generate(prompts, params(args.output_len), use_tqdm=False)
    job_s = time.perf_counter() - start
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == args.num_requests * args.output_len
    res["quanta_job_s"] = job_s
    res["quanta_job_tok_s"] = (n_in + n_out) / job_s
    res["job_prompt_tokens"], res["job_output_tokens"] = n_in, n_out
    decode_only = [s for t, n, s in steps if t == n]
    res["job_steps"] = {
        "count": len(steps),
        "sum_s": sum(s for *_, s in steps),
        "max_s": max(s for *_, s in steps),
        "decode_only_count": len(decode_only),
        "decode_only_sum_s": sum(decode_only),
        "mixed_sum_s": sum(s for t, n, s in steps if t != n),
    }

    # Decode step time at fixed batch sizes: prompts of 128 tokens, then 40 pure decode steps.
    for batch in (1, 32, 128):
        steps.clear()
        for i, p in enumerate(workload(batch, 128, 128, vocab, seed=1000 + batch)):
            engine.add_request(f"dec{batch}-{i}", p, params(48))
        while engine.has_unfinished_requests():
            engine.step()
        decode = [s for tokens, n, s in steps if tokens == batch and n == batch][2:42]
        res[f"decode_ms_b{batch}"] = 1e3 * statistics.median(decode)

    # Prefill: 8 prompts of 1024 tokens fill one 8192-token step.
    tokens = args.max_num_batched_tokens
    for trial in range(3):
        steps.clear()
        llm.generate(
            workload(tokens // 1024, 1024, 1024, vocab, seed=2000 + trial), params(1), use_tqdm=False
        )
    full = [s for t, _, s in steps if t == tokens]
    prefill_s = min(full)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    linear_params = weight_bytes(cfg) // 2 - 2 * cfg["vocab_size"] * h
    attn_flops = 4 * (tokens // 1024) * (1024 * 1025 // 2) * h * layers  # causal QK^T and PV
    flops = 2 * linear_params * tokens + attn_flops + 2 * cfg["vocab_size"] * h * (tokens // 1024)
    res["prefill_8k_ms"] = 1e3 * prefill_s
    res["prefill_8k_tflops"] = flops / prefill_s / 1e12
    del llm, engine
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


HF_WORKER = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig
spec = json.loads(open(sys.argv[1]).read())
cfg = LlamaConfig(**spec["shape"])
with torch.device(spec["device"]):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="paged|sdpa").eval()
gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=spec["output_len"])
model.generate_batch(spec["prompts"][:8], generation_config=gen, max_new_tokens=8)  # warm-up
start = time.perf_counter()
out = model.generate_batch(spec["prompts"], generation_config=gen)
secs = time.perf_counter() - start
n_out = sum(len(r.generated_tokens) for r in out.values())
print(json.dumps({"hf_job_s": secs, "hf_output_tokens": n_out}))
"""


def run_hf(args: argparse.Namespace, res: dict[str, Any]) -> None:
    shape = SHAPES[args.shape]
    prompts = workload(args.num_requests, 128, 1024, shape["vocab_size"], seed=0)
    spec = json.dumps(
        {"shape": shape, "prompts": prompts, "output_len": args.output_len, "device": args.device}
    )
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(HF_WORKER)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec_file:
        spec_file.write(spec)
    proc = subprocess.run(
        [sys.executable, f.name, spec_file.name], capture_output=True, text=True, timeout=args.hf_timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(got)
    n_in = sum(len(p) for p in prompts)
    res["hf_job_tok_s"] = (n_in + got["hf_output_tokens"]) / got["hf_job_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/gpu_offline.json")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script with --shape tiny")
    p.add_argument("--hf-timeout", type=float, default=240)
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_offline.py needs a CUDA GPU (or --device cpu --shape tiny for a dry run)")
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    errors: dict[str, str] = {}
    res.update(measure_ceilings() if cuda else {"copy_gbps": 10.0, "matmul_tflops": 1.0})
    if cuda:
        torch.cuda.empty_cache()
    res["decode_floor_ms"] = weight_bytes(SHAPES[args.shape]) / (res["copy_gbps"] * 1e9) * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp), SHAPES[args.shape])
        for name, fn in (
            ("quanta", lambda: run_quanta(folder, args, res)),
            ("hf", lambda: run_hf(args, res)),
        ):
            if name == "hf" and args.skip_hf:
                continue
            try:
                fn()
            except Exception as e:  # report what ran; one failure must not lose the other's numbers
                errors[name] = f"{type(e).__name__}: {e}"[-3000:]
                print(f"{name} failed: {errors[name]}", file=sys.stderr)
    res["errors"] = errors
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))

    def row(label: str, key: str, fmt: str = "{:.2f}", extra: str = "") -> None:
        value = res.get(key)
        print(f"{label:<44} {fmt.format(value) if value is not None else '-':>12} {extra}")

    print(f"\n{res['device']}  torch {res['torch']}")
    row("HBM copy (GB/s, read+write)", "copy_gbps", "{:.0f}")
    row("bf16 matmul 8192^3 (TFLOP/s)", "matmul_tflops", "{:.0f}")
    row("decode floor: weights / copy bw (ms)", "decode_floor_ms")
    row("quanta start-up (s)", "quanta_startup_s")
    row("quanta 256-request job (s)", "quanta_job_s")
    row("quanta job tokens/s", "quanta_job_tok_s", "{:.0f}")
    row("transformers generate_batch job (s)", "hf_job_s")
    row("transformers job tokens/s", "hf_job_tok_s", "{:.0f}")
    if "quanta_job_s" in res and "hf_job_s" in res:
        print(f"{'speed-up vs transformers':<44} {res['hf_job_s'] / res['quanta_job_s']:>12.2f}x")
    for b in (1, 32, 128):
        if f"decode_ms_b{b}" in res:
            ratio = res[f"decode_ms_b{b}"] / res["decode_floor_ms"]
            row(f"decode step, batch {b} (ms)", f"decode_ms_b{b}", extra=f"{ratio:.2f}x floor")
    row("prefill step of 8192 tokens (ms)", "prefill_8k_ms")
    if "prefill_8k_tflops" in res:
        frac = res["prefill_8k_tflops"] / res["matmul_tflops"]
        row("prefill TFLOP/s", "prefill_8k_tflops", "{:.0f}", f"{frac:.0%} of measured matmul peak")
    if "job_steps" in res:
        print("quanta job steps:", json.dumps(res["job_steps"]))
    if errors:
        print("errors:", json.dumps(errors, indent=1))


if __name__ == "__main__":
    main()
