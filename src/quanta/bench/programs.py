"""`quanta bench serve --programs`: agent programs against any OpenAI-compatible server, in closed loop.

The same driver as the simulator's (`quanta.sim.programs.ProgramSource`): a program's next call is sent
when its previous call's answer is in and its tool has run (tool_s), with the program's context so far
plus the call's new tokens as the prompt (token ids, /v1/completions), and `session_id`/`program_id`,
`tool_name`, `final_turn` in the extra body, so a server that keeps a program's KV (quanta's continuum
policy) can. The answer's text is not re-tokenized: the context goes on with as many stand-in ids as
the answer had tokens, so the previous prompt (not its answer) is the part a server can reuse.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from quanta.bench.serve import BenchResult, _send
from quanta.request import Request
from quanta.sim.programs import Program, ProgramSource


async def run_programs(
    base_url: str,
    model: str,
    programs: Sequence[Program],
    vocab: int,
    *,
    api_key: str | None = None,
    temperature: float = 0.0,
    ignore_eos: bool = True,
) -> tuple[ProgramSource, list[BenchResult], float]:
    """Run every program to its end; returns the source (per-program records: JCT, TTFT per call), the
    calls' results and the wall time."""
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    source = ProgramSource(programs, exact_lengths=True, vocab=(min(3, vocab - 1), vocab))
    results: list[BenchResult] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()

        async def call(req: Request) -> tuple[Request, BenchResult]:
            body: dict[str, Any] = {
                "model": model,
                "prompt": req.prompt_token_ids,
                "max_tokens": req.sampling_params.max_tokens,
                "temperature": temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
                "session_id": req.program_id,
                "program_id": req.program_id,
                "final_turn": req.final_turn,
            }
            if req.tool_name:
                body["tool_name"] = req.tool_name
            if ignore_eos:
                body["ignore_eos"] = True
            result = BenchResult(len(results), req.tenant, False, None, 0.0, req.num_prompt_tokens)
            results.append(result)
            await _send(session, url, body, headers, result, t0)
            return req, result

        inflight: set[asyncio.Task] = set()
        while source.has_pending() or inflight:
            now = time.perf_counter() - t0
            while source.next_arrival_time() <= now:
                inflight.add(asyncio.create_task(call(source.pop())))
            wait = source.next_arrival_time() - now
            if not inflight:
                await asyncio.sleep(max(wait, 0.0))
                continue
            done, inflight = await asyncio.wait(
                inflight,
                timeout=None if wait == float("inf") else max(wait, 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in done:
                req, result = task.result()
                end = result.sent + (result.e2e or 0.0)
                if result.ttft is not None:
                    req.times.first_token = result.sent + result.ttft
                # Stand-in ids for the answer (see the module docstring): the context grows by its length.
                for _ in range(max(result.output_tokens, 1)):
                    req.all_token_ids.append(req.prompt_token_ids[-1])
                source.on_finished(req, end)
        wall = time.perf_counter() - t0
    return source, results, wall


def program_report(source: ProgramSource, results: Sequence[BenchResult], wall: float) -> dict:
    jct = [r.jct for r in source.records if r.jct is not None]
    ttft = [r.ttft for r in results if r.ttft is not None]
    return {
        "programs": len(source.records),
        "completed_programs": len(jct),
        "calls": len(results),
        "failed_calls": sum(1 for r in results if not r.ok),
        "duration_s": wall,
        "programs_per_s": len(jct) / wall if wall > 0 else 0.0,
        "jct_mean_s": statistics.mean(jct) if jct else None,
        "jct_p50_s": float(np.percentile(jct, 50)) if jct else None,
        "jct_p99_s": float(np.percentile(jct, 99)) if jct else None,
        "ttft_mean_s": statistics.mean(ttft) if ttft else None,
        "ttft_p99_s": float(np.percentile(ttft, 99)) if ttft else None,
        "ttft_max_s": max(ttft) if ttft else None,
    }
