from quanta.engine.core import EngineCore, StepOutput
from quanta.engine.llm import LLM
from quanta.engine.llm_engine import EngineArgs, LLMEngine
from quanta.engine.output import CompletionOutput, Logprob, RequestOutput

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "EngineCore",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "StepOutput",
]
