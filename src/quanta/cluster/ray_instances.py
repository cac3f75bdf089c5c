"""Engine instances as Ray actors: one InstanceWorker per actor, placed by Ray on the cluster's nodes.

Only the cluster path imports Ray. Each actor runs its own step loop on a thread (the worker's); its
methods run on Ray's threads (`max_concurrency`), so a long poll does not hold up an `add`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from quanta.cluster.instances import InstanceDiedError

NAMESPACE = "quanta"


def init_ray(address: str | None = None) -> bool:
    """Join the Ray cluster at `address` (e.g. "127.0.0.1:6379" or "auto"), or start a local one.
    Whether this call started Ray (False: this process had it running already)."""
    try:
        import ray
    except ImportError:
        raise ValueError(
            "several instances run on Ray, which is not installed: pip install 'quanta[cluster]'"
        ) from None

    if ray.is_initialized():
        return False
    _check_reachable(address)
    ray.init(
        address=address,
        namespace=NAMESPACE,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )
    return True


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A host:port address that takes no TCP connection is an error now (ray.init would retry it for
    minutes)."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return  # local, or a form Ray checks itself
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {e}") from None


def _creation_error(e: BaseException) -> str:
    """The last line of an actor's creation error (the exception its __init__ raised), not Ray's
    traceback around it."""
    lines = [line.strip() for line in str(getattr(e, "error_msg", e)).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


class RayObjectTransport:
    """KV payloads of a migration through Ray's object store: the source puts the payload, the controller
    passes the reference on, the destination gets it (straight from the source's node)."""

    def send(self, payload: Any) -> Any:
        import ray

        return ray.put(payload)

    def recv(self, handle: Any) -> Any:
        import ray

        return ray.get(handle)

    def seconds(self, nbytes: int) -> float:
        return 0.0  # measured, not modelled: the migration's own timestamps tell


class RayInstances:
    def __init__(
        self,
        engine_args: Any,
        num_instances: int,
        epoch: float,
        address: str | None = None,
        name_prefix: str | None = None,
    ) -> None:
        from quanta.cluster.worker import InstanceWorker

        if num_instances < 1:
            raise ValueError(f"instances must be at least 1, got {num_instances}")
        started = init_ray(address)
        import ray

        self._ray = ray
        self.prefix = name_prefix or f"quanta-{uuid.uuid4().hex[:8]}"
        gpu = engine_args.device.startswith("cuda")
        if gpu:  # an instance per GPU: more instances than GPUs would wait for a GPU forever
            gpus = int(ray.cluster_resources().get("GPU", 0))
            if gpus < num_instances:
                raise ValueError(f"{num_instances} instances on cuda need a GPU each; the Ray cluster has {gpus}")
        # On CPUs the instances share the node's cores: each gets its share of torch threads and asks
        # Ray for none (a CPU instance must not wait for a free Ray CPU slot).
        threads = None if gpu else max(1, (os.cpu_count() or 1) // num_instances)
        actor = ray.remote(InstanceWorker)
        self._names = [f"{self.prefix}-{i}" for i in range(num_instances)]
        self.actors = [
            actor.options(
                name=name,
                namespace=NAMESPACE,
                num_cpus=0,
                num_gpus=1 if gpu else 0,
                max_concurrency=16,
                max_restarts=0,
            ).remote(engine_args, i, epoch, threads, RayObjectTransport())
            for i, name in enumerate(self._names)
        ]
        from ray.exceptions import RayActorError

        try:
            ray.get([a.info.remote() for a in self.actors])  # every instance has loaded its model
        except RayActorError as e:  # an instance's engine refused its arguments, or its model
            for a in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
            if started and address is None:  # the local Ray started here: stop it (and its log echo) now
                ray.shutdown()
            raise ValueError(f"an engine instance did not start: {_creation_error(e)}") from None
        self.address = ray.get_runtime_context().gcs_address

    @property
    def num_instances(self) -> int:
        return len(self.actors)

    def submit(self, index: int, method: str, *args: Any) -> Any:
        return getattr(self.actors[index], method).remote(*args)

    def wait(self, futures: Sequence[Any], timeout: float) -> list[Any]:
        ready, _ = self._ray.wait(list(futures), num_returns=1, timeout=timeout)
        return ready

    def result(self, index: int, future: Any) -> Any:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self._ray.get(future)
        except RayActorError as e:
            raise InstanceDiedError(index, e) from e
        except RayTaskError as e:  # the method raised: raise what it raised
            cause = e.cause if isinstance(e.cause, BaseException) else e
            raise cause from None

    def kill(self, index: int) -> None:
        self._ray.kill(self.actors[index], no_restart=True)

    def names(self) -> list[str]:
        return list(self._names)

    def shutdown(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # already gone
                self._ray.get(a.shutdown.remote(), timeout=30)
            self._ray.kill(a, no_restart=True)
