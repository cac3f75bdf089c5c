"""Convert public agent trajectories with measured tool times into program traces (quanta.sim.programs).

Input: a JSON list (or JSONL) of trajectories, each with "messages" (a list, or that list as a JSON
string) in the OpenAI chat shape that SWE-agent / SWE-smith trajectories use: system and user messages,
assistant messages carrying "tool_calls" (each may give "execution_time_seconds", the tool's measured
run time), and "tool" messages with the observations. Every assistant message is one LLM call: its new
tokens are the messages since the previous call (the first call: the system prompt and the task), its
output the assistant's text and tool-call arguments, its tool the first tool call's name and tool_s the
sum of its tool calls' execution times. Token counts come from a tokenizer.json when given, else about
4 characters a token.

    python -m quanta.sim.agent_traces IN.json OUT.jsonl [--rate 0.5] [--tokenizer tokenizer.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from quanta.sim.programs import Program, Turn, write_programs

CHARS_PER_TOKEN = 4


def _text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _tool_calls(msg: dict) -> list[dict]:
    calls = msg.get("tool_calls") or []
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            return []
    return [c for c in calls if isinstance(c, dict)]


def trajectory_program(
    messages: list[dict], program_id: str, arrival: float, count: Callable[[str], int]
) -> Program | None:
    """One trajectory as a program; None when it has no assistant message."""
    turns: list[Turn] = []
    pending = 0
    for msg in messages:
        if not isinstance(msg, dict):
            raise ValueError(f"{program_id}: a message is not an object")
        if msg.get("role") != "assistant":
            pending += count(_text(msg.get("content")))
            continue
        calls = _tool_calls(msg)
        out_text = _text(msg.get("content")) + "".join(
            str(c.get("function", {}).get("name", "")) + str(c.get("function", {}).get("arguments", ""))
            for c in calls
        )
        tool_s = sum(float(c.get("execution_time_seconds") or 0.0) for c in calls)
        tool = str(calls[0].get("function", {}).get("name")) if calls else None
        turns.append(Turn(max(pending, 1), max(count(out_text), 1), tool, max(tool_s, 0.0)))
        pending = 0
    if not turns:
        return None
    turns[-1].tool, turns[-1].tool_s = None, 0.0  # nothing follows the last call
    return Program(program_id, arrival, turns, "trajectory")


def _trajectories(path: Path) -> Iterable[dict]:
    text = path.read_text()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def convert(
    path: str | Path, rate: float | None = None, seed: int = 0, tokenizer: str | Path | None = None
) -> list[Program]:
    """Programs from a trajectory file, arriving as a Poisson process at `rate` per second (None: all at 0)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trajectory file {str(path)!r} does not exist")
    if tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))

        def count(s: str) -> int:
            return len(tok.encode(s, add_special_tokens=False).ids)
    else:

        def count(s: str) -> int:
            return -(-len(s) // CHARS_PER_TOKEN)

    rng = np.random.default_rng(seed)
    programs: list[Program] = []
    t = 0.0
    for i, traj in enumerate(_trajectories(path)):
        if not isinstance(traj, dict) or "messages" not in traj:
            raise ValueError(f"{path}: trajectory {i} has no 'messages'")
        messages = traj["messages"]
        if isinstance(messages, str):
            messages = json.loads(messages)
        pid = str(traj.get("traj_id") or traj.get("instance_id") or f"traj{i}")
        if any(p.program_id == pid for p in programs):
            pid = f"{pid}#{i}"
        program = trajectory_program(messages, pid, t, count)
        if program is not None:
            programs.append(program)
            if rate:
                t += float(rng.exponential(1 / rate))
    if not programs:
        raise ValueError(f"{path}: no trajectory has an assistant message")
    return programs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="agent trajectories -> quanta program trace (JSONL)")
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--rate", type=float, default=None, help="programs per second (default: all at t=0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json to count tokens with")
    args = ap.parse_args(argv)
    try:
        programs = convert(args.input, args.rate, args.seed, args.tokenizer)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_programs(args.output, programs)
    turns = [len(p.turns) for p in programs]
    tools = [t.tool_s for p in programs for t in p.turns[:-1]]
    print(
        f"wrote {args.output}: {len(programs)} programs, {np.mean(turns):.1f} calls each, tool time "
        f"{np.mean(tools) * 1000:.0f} +- {np.std(tools) * 1000:.0f} ms, "
        f"{np.mean([p.prompt_tokens for p in programs]) / 1000:.0f}k prompt tokens per program"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
