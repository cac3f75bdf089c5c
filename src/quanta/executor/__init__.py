"""Executors: `ModelExecutor` (torch, imported from quanta.executor.model_executor) and cost-model ones."""

from quanta.executor.base import Executor, StepResult, TokenLogprobs

__all__ = ["Executor", "StepResult", "TokenLogprobs"]
