"""Agent programs: a program trace format, synthetic generators, and the closed-loop driver.

An agent sends a call, waits for its tool, then sends the next call with the whole context so far plus
the tool's result. Program trace (JSONL, one program per line):
  {"program_id": "p0", "arrival": 0.0,
   "turns": [{"new_tokens": 3000, "output_tokens": 150, "tool": "bash", "tool_s": 0.8}, ...]}
new_tokens: tokens the call adds to the context (the first call: its whole prompt; later: the tool's
result); output_tokens: what the model answers (the true length); tool, tool_s: the tool called after
this turn and how long it ran (ignored on the last turn). Optional: "group" (a label for reports).

`ProgramSource` drives programs in closed loop: turn k+1 arrives at finish(k) + tool_s(k), with prompt =
turn k's prompt + its output + turn k+1's new tokens, so its prompt extends the previous one token for
token and prefix hits happen as they do on a real engine. The simulator, the real engine
(`drive_engine`) and `quanta bench serve` all pull calls from it.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quanta.request import Request
from quanta.sampling_params import SamplingParams
from quanta.sim.workload import EOS_TOKEN_ID, _stream

if TYPE_CHECKING:
    from quanta.engine.core import EngineCore, StepOutput


@dataclass(slots=True)
class Turn:
    new_tokens: int
    output_tokens: int
    tool: str | None = None
    tool_s: float = 0.0  # the tool's run time after this turn


@dataclass(slots=True)
class Program:
    program_id: str
    arrival: float
    turns: list[Turn]
    group: str = "default"

    @property
    def context_len(self) -> int:
        """Tokens in the last call's context (its prompt and output)."""
        return sum(t.new_tokens + t.output_tokens for t in self.turns)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens summed over the calls: what an engine without any cache would prefill."""
        total = ctx = 0
        for t in self.turns:
            ctx += t.new_tokens
            total += ctx
            ctx += t.output_tokens
        return total


def _parse_program(raw: dict, where: str) -> Program:
    try:
        turns_raw = raw["turns"]
        if not isinstance(turns_raw, list) or not turns_raw:
            raise ValueError("turns must be a non-empty list")
        turns = []
        for j, t in enumerate(turns_raw):
            turn = Turn(
                int(t["new_tokens"]), int(t["output_tokens"]), t.get("tool"), float(t.get("tool_s", 0.0))
            )
            if turn.new_tokens < 1 or turn.output_tokens < 1:
                raise ValueError(f"turn {j}: new_tokens and output_tokens must be at least 1")
            if not (turn.tool_s >= 0 and math.isfinite(turn.tool_s)):
                raise ValueError(f"turn {j}: tool_s must be a finite number >= 0")
            turns.append(turn)
        arrival = float(raw.get("arrival", 0.0))
        if not (arrival >= 0 and math.isfinite(arrival)):
            raise ValueError("arrival must be a finite number >= 0")
        return Program(str(raw["program_id"]), arrival, turns, str(raw.get("group", "default")))
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # Overflow: int(inf) of a 1e400
        raise ValueError(f"{where}: {e}") from None


def read_programs(path: str | Path) -> list[Program]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"program trace {str(path)!r} does not exist")
    programs = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: {e}") from None
            programs.append(_parse_program(raw, f"{path}:{i}"))
    if not programs:
        raise ValueError(f"program trace {str(path)!r} has no programs")
    ids = [p.program_id for p in programs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"program trace {str(path)!r} repeats a program_id")
    return sorted(programs, key=lambda p: p.arrival)


def write_programs(path: str | Path, programs: Sequence[Program]) -> None:
    lines = []
    for p in programs:
        turns = [
            {"new_tokens": t.new_tokens, "output_tokens": t.output_tokens, "tool": t.tool, "tool_s": t.tool_s}
            for t in p.turns
        ]
        lines.append(
            json.dumps({"program_id": p.program_id, "arrival": p.arrival, "group": p.group, "turns": turns})
        )
    Path(path).write_text("".join(line + "\n" for line in lines))


# ---- synthetic programs ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProgramShape:
    """A program population: turns ~ 1 + Poisson(mean_turns - 1); tool time lognormal with the given mean
    and standard deviation (seconds); first prompt, per-turn new tokens and outputs lognormal (median,
    sigma), clipped to the context."""

    mean_turns: float
    tool_mean_s: float
    tool_std_s: float
    first_prompt: tuple[float, float]
    new_tokens: tuple[float, float]
    output_tokens: tuple[float, float]
    tools: tuple[str, ...] = ("tool",)


# Fitted to Continuum's published trace statistics (../shared/specs/continuum.md): SWE-bench agents
# 10.9 turns, tool time 925 +- 3550 ms, about 70k prompt tokens per program summed over its calls (a
# 3k-token first prompt, ~550 new tokens and ~150 output tokens a turn give 10.9 * 3k + 54.5 * 700);
# BFCL v4 6.3 turns, 1923 +- 2133 ms (token counts not published: function docs of ~1.5k tokens).
SHAPES: dict[str, ProgramShape] = {
    "swe": ProgramShape(10.9, 0.925, 3.55, (3000, 0.3), (380, 0.8), (130, 0.6), ("bash", "edit", "search")),
    "bfcl": ProgramShape(6.3, 1.923, 2.133, (1500, 0.3), (120, 0.6), (60, 0.6), ("api",)),
    # For fairness tests: one-call-and-done programs and long ones.
    "short": ProgramShape(2.0, 0.5, 0.5, (300, 0.3), (60, 0.5), (40, 0.5)),
    "long": ProgramShape(20.0, 0.5, 0.5, (2000, 0.3), (300, 0.5), (200, 0.5)),
}


def _lognormal_mean_std(rng: np.random.Generator, mean: float, std: float, n: int) -> np.ndarray:
    sigma2 = math.log(1 + (std / mean) ** 2)
    return rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)


def synthetic_programs(
    shape: str | ProgramShape,
    n: int,
    rate: float | None,
    seed: int = 0,
    max_context: int = 32768,
    prefix: str = "p",
    group: str | None = None,
) -> list[Program]:
    """`n` programs arriving as a Poisson process at `rate` programs/s (None: all at t=0)."""
    name = shape if isinstance(shape, str) else "custom"
    if isinstance(shape, str):
        try:
            shape = SHAPES[shape]
        except KeyError:
            raise ValueError(f"unknown program shape {name!r}; choose from {', '.join(SHAPES)}") from None
    if n < 1:
        raise ValueError("n must be at least 1")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be positive (programs per second), got {rate}")
    rng = np.random.default_rng(seed)
    arrivals = np.zeros(n)
    if rate:  # a Poisson process; the first program arrives at t=0
        arrivals = np.cumsum(rng.exponential(1 / rate, n))
        arrivals -= arrivals[0]
    programs = []
    for i in range(n):
        k = 1 + int(rng.poisson(shape.mean_turns - 1))
        firsts = rng.lognormal(math.log(shape.first_prompt[0]), shape.first_prompt[1])
        news = rng.lognormal(math.log(shape.new_tokens[0]), shape.new_tokens[1], k)
        outs = rng.lognormal(math.log(shape.output_tokens[0]), shape.output_tokens[1], k)
        tools = _lognormal_mean_std(rng, shape.tool_mean_s, shape.tool_std_s, k)
        names = rng.integers(0, len(shape.tools), k)
        turns, ctx = [], 0
        for j in range(k):
            new = max(1, int(firsts if j == 0 else news[j]))
            out = max(1, int(outs[j]))
            if ctx + new + out > max_context - 1:  # the program ends where its context would overflow
                break
            ctx += new + out
            turns.append(Turn(new, out, shape.tools[names[j]], float(tools[j])))
        if not turns:
            turns = [Turn(max(1, min(int(firsts), max_context // 2)), 1)]
        programs.append(Program(f"{prefix}{i}", float(arrivals[i]), turns, group or name))
    return programs


# ---- the closed-loop driver ---------------------------------------------------------------------------
@dataclass(slots=True)
class TurnRecord:
    request_id: str
    arrival: float
    prompt_len: int
    first_token: float | None = None
    finished: float | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    preemptions: int = 0


@dataclass(slots=True)
class ProgramRecord:
    program: Program
    turns: list[TurnRecord] = field(default_factory=list)

    @property
    def finished(self) -> float | None:
        if len(self.turns) < len(self.program.turns):
            return None
        return self.turns[-1].finished

    @property
    def jct(self) -> float | None:
        """Job completion time: from the program's arrival (its first call's) to its last call's end."""
        end = self.finished
        return None if end is None else end - self.turns[0].arrival


class ProgramSource:
    """Arrivals of programs' calls, in closed loop. `pop` hands out the next call (by arrival time);
    `on_finished(request, t)` schedules the program's next call at t + the tool's time.

    exact_lengths: calls carry max_tokens = their output length, ignore EOS and sample greedily (a real
    engine, whose model would stop where it likes); otherwise (simulation) the true lengths are in `output_lengths` for a
    SimExecutor, and requests carry `default_max_tokens`."""

    def __init__(
        self,
        programs: Sequence[Program],
        exact_lengths: bool = False,
        default_max_tokens: int | None = None,
        eos_token_ids: tuple[int, ...] = (EOS_TOKEN_ID,),
        vocab: tuple[int, int] | None = None,
        start: float = 0.0,
    ) -> None:
        ids = [p.program_id for p in programs]
        if len(set(ids)) != len(ids):
            raise ValueError("program ids must be unique")
        self.programs = list(programs)
        self.exact_lengths = exact_lengths
        self.default_max_tokens = default_max_tokens
        self.eos_token_ids = eos_token_ids
        self.vocab = vocab  # (low, high): map token ids into a small model's vocabulary
        self.output_lengths: dict[str, int] = {}  # request id -> true output length (for a SimExecutor)
        self.records = [ProgramRecord(p) for p in self.programs]
        self._by_request: dict[str, tuple[int, int]] = {}  # request id -> (program index, turn index)
        self._context: dict[int, list[int]] = {}  # program index -> its last call's tokens (prompt + output)
        self._stream_pos = [0] * len(self.programs)
        # Clock times: trace times shifted by `start` (a wall clock's reading when the replay begins).
        self.start = start
        self._heap: list[tuple[float, int, int]] = [
            (start + p.arrival, i, 0) for i, p in enumerate(self.programs)
        ]
        heapq.heapify(self._heap)
        self.num_calls = sum(len(p.turns) for p in self.programs)
        self.num_popped = 0

    @property
    def first_arrival(self) -> float:
        return self.start + min((p.arrival for p in self.programs), default=0.0)

    @property
    def max_context(self) -> int:
        return max((p.context_len for p in self.programs), default=0)

    def next_arrival_time(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def has_pending(self) -> bool:
        return bool(self._heap)

    def done(self) -> bool:
        return self.num_popped == self.num_calls and all(r.finished is not None for r in self.records)

    def _tokens(self, i: int, n: int) -> list[int]:
        pos = self._stream_pos[i]
        self._stream_pos[i] = pos + n
        ids = _stream(i, pos, pos + n)
        if self.vocab is not None:
            low, high = self.vocab
            ids = [low + t % (high - low) for t in ids]
        return ids

    def pop(self) -> Request:
        t, i, k = heapq.heappop(self._heap)
        program = self.programs[i]
        turn = program.turns[k]
        prompt = self._context.pop(i, []) + self._tokens(i, turn.new_tokens)
        rid = f"{program.program_id}/t{k}"
        if self.exact_lengths:
            params = SamplingParams(max_tokens=turn.output_tokens, ignore_eos=True, temperature=0.0)
        else:
            params = SamplingParams(max_tokens=self.default_max_tokens)
            self.output_lengths[rid] = turn.output_tokens
        final = k == len(program.turns) - 1
        req = Request(
            rid,
            prompt,
            params,
            arrival_time=t,
            tenant=program.group,
            program_id=program.program_id,
            tool_name=None if final else turn.tool,
            final_turn=final,
            eos_token_ids=self.eos_token_ids,
        )
        self._by_request[rid] = (i, k)
        self.records[i].turns.append(TurnRecord(rid, t, len(prompt)))
        self.num_popped += 1
        return req

    def on_finished(self, req: Request, t: float) -> None:
        """A call ended at time t: record it, and schedule its program's next call after the tool ran."""
        where = self._by_request.pop(req.request_id, None)
        if where is None:
            return  # not one of ours
        i, k = where
        rec = self.records[i].turns[k]
        rec.first_token, rec.finished = req.times.first_token, t
        rec.cached_tokens, rec.preemptions = req.num_cached_tokens, req.num_preemptions
        program = self.programs[i]
        if k + 1 < len(program.turns):
            self._context[i] = list(req.all_token_ids)
            heapq.heappush(self._heap, (t + program.turns[k].tool_s, i, k + 1))


def drive(
    core: EngineCore, source: ProgramSource, on_step: Callable[[StepOutput], None] | None = None
) -> int:
    """Run programs' calls on one engine (the real one with its wall clock, or any EngineCore) in closed
    loop until all are done: calls enter when their time comes, and each finished call tells the source.
    `on_step` sees every step (e.g. to check integrity). Returns the number of steps."""
    clock = core.clock
    steps = 0
    while source.has_pending() or core.has_unfinished():
        now = clock.now()
        while source.next_arrival_time() <= now:
            core.add_request(source.pop())
        if not core.has_unfinished():
            clock.wait_until(source.next_arrival_time())  # a tool is running: nothing to compute
            continue
        out = core.step()
        steps += 1
        for r in out.updated:
            if r.finished:
                source.on_finished(r, out.end)
        if on_step is not None:
            on_step(out)
    return steps
