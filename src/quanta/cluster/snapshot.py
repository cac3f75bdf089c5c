"""RequestSnapshot: everything a running request needs to continue on another instance exactly as it
would have here (the same next token, the same timestamps so far), as a plain picklable dataclass.

Taken on the source when it stops the request for the last migration stage; `to_request` rebuilds the
request on the destination. The constructor fields of `Request` are copied generically (a field added
to Request travels without a change here); progress and timestamps explicitly. `generator_state` is the
executor's per-request sampler state (a seeded request's torch.Generator), opaque bytes or None.
Clock readings (arrival, deadline, timestamps) travel in a common frame: the source adds its clock's
`unix_offset()`, the destination subtracts its own (virtual clocks of one simulation: 0, one frame).
"""

from __future__ import annotations

import copy
import dataclasses
from array import array
from dataclasses import dataclass
from typing import Any

from quanta.request import Request, RequestStatus, RequestTimes


@dataclass(slots=True)
class RequestSnapshot:
    request_id: str
    init_fields: dict[str, Any]  # Request's constructor arguments (prompt, sampling params, tenant, ...)
    output_token_ids: list[int]
    num_computed_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    times: RequestTimes
    generator_state: bytes | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.init_fields["prompt_token_ids"]) + len(self.output_token_ids)

    @classmethod
    def of(
        cls, req: Request, generator_state: bytes | None = None, clock_offset: float = 0.0
    ) -> RequestSnapshot:
        assert req.status == RequestStatus.RUNNING, f"{req.request_id} is not running"
        fields = {f.name: _copy(getattr(req, f.name)) for f in dataclasses.fields(req) if f.init}
        # Copies: in one process the two engines must not share a request's lists.
        snap = cls(
            req.request_id,
            fields,
            list(req.output_token_ids),
            req.num_computed_tokens,
            req.num_cached_tokens,
            req.num_preemptions,
            _copy_times(req.times),
            generator_state,
        )
        snap._shift(clock_offset)
        return snap

    def _shift(self, dt: float) -> None:
        if dt == 0.0:
            return
        f, t = self.init_fields, self.times
        f["arrival_time"] += dt
        if f.get("deadline") is not None:
            f["deadline"] += dt
        t.arrival += dt
        t.first_scheduled = None if t.first_scheduled is None else t.first_scheduled + dt
        t.first_token = None if t.first_token is None else t.first_token + dt
        t.finished = None if t.finished is None else t.finished + dt
        t.tokens = array("d", [x + dt for x in t.tokens])

    def to_request(self, clock_offset: float = 0.0) -> Request:
        """The request as the destination runs it (`clock_offset`: the destination clock's unix_offset)."""
        snap = RequestSnapshot(
            self.request_id,
            {k: _copy(v) for k, v in self.init_fields.items()},
            list(self.output_token_ids),
            self.num_computed_tokens,
            self.num_cached_tokens,
            self.num_preemptions,
            _copy_times(self.times),
            self.generator_state,
        )
        snap._shift(-clock_offset)
        req = Request(**snap.init_fields)
        req.output_token_ids = snap.output_token_ids
        req.all_token_ids = list(req.prompt_token_ids) + req.output_token_ids
        req.num_computed_tokens = snap.num_computed_tokens
        req.num_cached_tokens = snap.num_cached_tokens
        req.num_preemptions = snap.num_preemptions
        req.times = snap.times
        req.status = RequestStatus.RUNNING
        return req


def _copy(value: Any) -> Any:
    """A copy sharing nothing mutable, fast for the long token lists (ints need no deep copy)."""
    if isinstance(value, list):
        return list(value) if not value or type(value[0]) is int else copy.deepcopy(value)
    if isinstance(value, (str, int, float, bool, tuple, type(None))):
        return value
    return copy.deepcopy(value)


def _copy_times(t: RequestTimes) -> RequestTimes:
    return RequestTimes(t.arrival, t.first_scheduled, t.first_token, array("d", t.tokens), t.finished)
