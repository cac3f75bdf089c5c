"""Output-length predictors: what a policy may assume about how many tokens a request will generate.

A policy never sees the true length (the simulator knows it, as the model "knows" when it will emit
EOS; the server does not). Policies that need an estimate (wfq's cost, deadline's remaining time) ask
a predictor chosen by `policy_args["output_predictor"]`:
  "mean" (default)  the mean output length of the tenant's finished requests so far (all tenants' mean
                    before the tenant has any, `expected_output_tokens` before anyone has)
  "fixed"           `expected_output_tokens` (256) for every request
Every estimate is capped by the request's max_tokens and by the context left after its prompt. The same
predictor runs on the engine and in the simulator: it learns from the same finish events.
"""

from __future__ import annotations

from typing import Protocol

from quanta.config import SchedulerConfig
from quanta.request import Request, RequestStatus


class OutputLengthPredictor(Protocol):
    def predict(self, req: Request) -> int:
        """Expected number of output tokens of `req` (at least 1)."""
        ...

    def observe(self, req: Request) -> None:
        """`req` left the engine: learn from its output length."""
        ...


class FixedLength:
    def __init__(self, config: SchedulerConfig, tokens: int) -> None:
        self.max_model_len = config.max_model_len
        self.tokens = tokens

    def cap(self, req: Request, n: float) -> int:
        limit = self.max_model_len - req.num_prompt_tokens
        if req.sampling_params.max_tokens is not None:
            limit = min(limit, req.sampling_params.max_tokens)
        return max(1, min(round(n), limit))

    def predict(self, req: Request) -> int:
        return self.cap(req, self.tokens)

    def observe(self, req: Request) -> None:
        pass


class TenantMeanLength(FixedLength):
    """Running mean of finished output lengths, per tenant. A request cut by max_tokens or the context
    counts with the length it reached (a lower bound of what it wanted); aborted ones teach nothing."""

    def __init__(self, config: SchedulerConfig, tokens: int) -> None:
        super().__init__(config, tokens)
        self._sum: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._all_sum = 0.0
        self._all_count = 0

    def predict(self, req: Request) -> int:
        n = self._count.get(req.tenant, 0)
        if n:
            return self.cap(req, self._sum[req.tenant] / n)
        if self._all_count:
            return self.cap(req, self._all_sum / self._all_count)
        return self.cap(req, self.tokens)

    def observe(self, req: Request) -> None:
        if req.status == RequestStatus.FINISHED_ABORTED or not req.num_output_tokens:
            return
        t = req.tenant
        self._sum[t] = self._sum.get(t, 0.0) + req.num_output_tokens
        self._count[t] = self._count.get(t, 0) + 1
        self._all_sum += req.num_output_tokens
        self._all_count += 1


PREDICTORS = {"mean": TenantMeanLength, "fixed": FixedLength}


def make_predictor(config: SchedulerConfig) -> OutputLengthPredictor:
    args = config.policy_args
    name = str(args.get("output_predictor", "mean"))
    tokens = int(args.get("expected_output_tokens", 256))
    if tokens < 1:
        raise ValueError(f"expected_output_tokens must be at least 1, got {tokens}")
    try:
        cls = PREDICTORS[name]
    except KeyError:
        raise ValueError(f"unknown output_predictor {name!r}; choose from {', '.join(PREDICTORS)}") from None
    return cls(config, tokens)
