"""quanta: an LLM serving engine whose scheduler is the product."""

import os

# torch's OpenMP threads busy-wait between parallel regions by default. Where another process holds a
# core, a waiting thread burns the time slice its descheduled partner needs: on a loaded 2-core machine
# a 2-thread bf16 linear loop ran 13-16x slower than with passive waiting (and than 1 thread). The
# runtime reads this once, when torch loads it, so it only applies if quanta is imported before torch.
# Set OMP_WAIT_POLICY yourself (ACTIVE on a dedicated machine, say) to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from quanta.request import Request, RequestStatus
from quanta.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "Request", "RequestOutput", "RequestStatus", "SamplingParams"]


def __getattr__(name: str) -> object:
    # The offline API pulls in torch; the scheduler and simulator must not.
    if name in ("LLM", "RequestOutput", "CompletionOutput", "EngineArgs", "LLMEngine"):
        import quanta.engine as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'quanta' has no attribute {name!r}")
