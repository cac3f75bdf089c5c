"""quanta: an LLM serving engine whose scheduler is the product."""

import os

from quanta.request import Request, RequestStatus
from quanta.sampling_params import SamplingParams

# torch's OpenMP threads busy-wait between parallel regions by default. Where another process holds a
# core, a waiting thread burns the time slice its descheduled partner needs: on a loaded 2-core machine
# a 2-thread bf16 linear loop ran 13-16x slower than with passive waiting (and than 1 thread). The
# runtime reads this once, when torch loads it, so it only applies if quanta is imported before torch.
# Set OMP_WAIT_POLICY yourself (ACTIVE on a dedicated machine, say) to override.
# Other programs started from this process inherit it: `peer_environ()` is the environment without it.
_DEFAULTED_ENV = [k for k in ("OMP_WAIT_POLICY",) if k not in os.environ]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def peer_environ() -> dict[str, str]:
    """os.environ without the variables that importing quanta set (those the user had set stay): for
    starting another engine as its users run it (benchmarks against vLLM and transformers)."""
    return {k: v for k, v in os.environ.items() if k not in _DEFAULTED_ENV}


__version__ = "0.1.0"

__all__ = ["LLM", "Request", "RequestOutput", "RequestStatus", "SamplingParams"]


def __getattr__(name: str) -> object:
    # The offline API pulls in torch; the scheduler and simulator must not.
    if name in ("LLM", "RequestOutput", "CompletionOutput", "EngineArgs", "LLMEngine"):
        import quanta.engine as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'quanta' has no attribute {name!r}")
