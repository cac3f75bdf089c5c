"""Handles on a cluster's engine instances: Ray actors (`ray_instances.RayInstances`) or, for tests and
single-process use, InstanceWorkers in this process (`LocalInstances`). The front end only submits
method calls and waits on their futures, so it does not know which it has."""

from __future__ import annotations

import concurrent.futures
import pickle
from collections.abc import Sequence
from typing import Any, Protocol


class InstanceDiedError(RuntimeError):
    """The instance is gone (its actor died or was killed); its requests must go elsewhere."""

    def __init__(self, index: int, cause: BaseException | None = None) -> None:
        super().__init__(f"instance {index} is gone" + (f": {cause}" if cause else ""))
        self.index = index


class Instances(Protocol):
    @property
    def num_instances(self) -> int: ...

    def submit(self, index: int, method: str, *args: Any) -> Any:
        """Call a method of instance `index` without waiting; returns a future."""
        ...

    def wait(self, futures: Sequence[Any], timeout: float) -> list[Any]:
        """The futures (of `futures`) that are done, waiting up to `timeout` seconds for the first."""
        ...

    def result(self, index: int, future: Any) -> Any:
        """The call's result; its exception if it raised one; InstanceDiedError if the instance is gone."""
        ...

    def kill(self, index: int) -> None: ...

    def names(self) -> list[str]: ...

    @property
    def address(self) -> str | None:
        """Where other processes can join the instances' cluster (Ray's GCS address)."""
        ...

    def shutdown(self) -> None: ...


class LocalInstances:
    """InstanceWorkers in this process, each call run on a thread pool (calls block up to a step)."""

    def __init__(self, workers: list[Any]) -> None:
        self.workers = workers
        self.dead = [False] * len(workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4 * len(workers) + 2)
        self.address: str | None = None  # no cluster to join

    @property
    def num_instances(self) -> int:
        return len(self.workers)

    def submit(self, index: int, method: str, *args: Any) -> concurrent.futures.Future:
        if self.dead[index]:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_exception(InstanceDiedError(index))
            return fut
        # Arguments and results cross as copies, as they would between processes.
        return self._pool.submit(_call_copied, getattr(self.workers[index], method), _copied(args))

    def wait(self, futures: Sequence[concurrent.futures.Future], timeout: float) -> list[Any]:
        done, _ = concurrent.futures.wait(futures, timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return list(done)

    def result(self, index: int, future: concurrent.futures.Future) -> Any:
        try:
            return future.result()
        except Exception as e:
            if self.dead[index] and not isinstance(e, InstanceDiedError):
                raise InstanceDiedError(index, e) from e
            raise

    def kill(self, index: int) -> None:
        """Stop the instance as a crash would: its requests and KV are gone."""
        self.dead[index] = True
        self.workers[index].shutdown()

    def names(self) -> list[str]:
        return [f"local-{i}" for i in range(len(self.workers))]

    def shutdown(self) -> None:
        for i, w in enumerate(self.workers):
            if not self.dead[i]:
                w.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _copied(value: Any) -> Any:
    return pickle.loads(pickle.dumps(value))


def _call_copied(fn: Any, args: tuple) -> Any:
    return _copied(fn(*args))
