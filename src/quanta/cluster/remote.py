"""RemoteEndpoint: an instance's MigrationEndpoint as the migration state machine calls it from the
cluster's front end, each method one call to the instance (a Ray actor call, ~1 ms, or an in-process
worker's); the instances keep stepping meanwhile."""

from __future__ import annotations

from typing import Any

from quanta.cluster.instances import Instances


class RemoteEndpoint:
    """Blocking calls, so it runs on a migration's own thread, never the front end's."""

    def __init__(self, instances: Instances, index: int) -> None:
        self._instances = instances
        self.index = index
        self.stopped: Any = None  # the RequestSnapshot of a last stage, once seen

    def _call(self, method: str, *args: Any) -> Any:
        inst = self._instances
        return inst.result(self.index, inst.submit(self.index, "migration", method, *args))

    def reserve(self, request_id: str, num_blocks: int) -> bool:
        return self._call("reserve", request_id, num_blocks)

    def stage_out(self, request_id: str, start_block: int, last: bool) -> Any:
        out = self._call("stage_out", request_id, start_block, last)
        if out.snapshot is not None:
            self.stopped = out.snapshot
        return out

    def stage_in(self, request_id: str, out: Any) -> bool:
        return self._call("stage_in", request_id, out)

    def abort_in(self, request_id: str) -> None:
        self._call("abort_in", request_id)

    def finish_out(self, request_id: str, committed: bool) -> bool:
        return self._call("finish_out", request_id, committed)

    def abort(self, request_ids: list[str]) -> None:
        self._call("abort", request_ids)
