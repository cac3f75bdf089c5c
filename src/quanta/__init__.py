"""quanta: an LLM serving engine whose scheduler is the product."""

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
