"""Feed requests to an EngineCore at their arrival times, on whatever clock the engine has.

The same loop drives the real engine (wall clock: it sleeps while idle) and the simulator (virtual
clock: it jumps), so a trace runs through identical code in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quanta.engine.core import EngineCore, StepOutput
from quanta.request import Request


@dataclass(slots=True)
class StepRecord:
    admit_time: float  # clock reading at which arrivals were admitted before this step
    summary: tuple  # StepPlan.summary()
    start: float
    end: float


def run_arrivals(
    core: EngineCore, requests: Sequence[Request], on_step: Callable[[StepOutput], None] | None = None
) -> list[StepRecord]:
    """Run until every request (admitted at its `arrival_time`) has finished; returns one record per step."""
    pending = sorted(requests, key=lambda r: r.arrival_time)
    records: list[StepRecord] = []
    i = 0
    while i < len(pending) or core.has_unfinished():
        now = core.clock.now()
        while i < len(pending) and pending[i].arrival_time <= now:
            core.add_request(pending[i])
            i += 1
        if not core.has_unfinished():
            core.clock.wait_until(pending[i].arrival_time)
            continue
        out = core.step()
        records.append(StepRecord(now, out.plan.summary(), out.start, out.end))
        if on_step is not None:
            on_step(out)
    return records
