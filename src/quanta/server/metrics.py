"""Prometheus collectors of the server, named like vLLM's (`vllm:` -> `quanta:`) so dashboards carry over.

Each app gets its own CollectorRegistry (tests start several). Counters and histograms are updated on
the engine thread after every step; gauges are read from the engine state at scrape time.

Tenant names come from clients, so the tenant label is capped: the first `max_tenant_labels` tenants get
their own series and later ones share the OTHER_TENANT label, which keeps the number of series bounded.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from quanta.engine.core import StepOutput
from quanta.engine.llm_engine import CacheCounters, EngineFrontend, EngineState
from quanta.engine.output import RequestOutput
from quanta.metrics import RequestMetrics
from quanta.request import Request
from quanta.server import DEFAULT_MAX_TENANT_LABELS

logger = logging.getLogger("quanta.server")
OTHER_TENANT = "__other__"

# vLLM's buckets for the latency histograms.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_TOKEN_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class ServerMetrics:
    def __init__(
        self, model_name: str, block_size: int, max_tenant_labels: int = DEFAULT_MAX_TENANT_LABELS
    ) -> None:
        if max_tenant_labels < 1:
            raise ValueError(f"max_tenant_labels must be at least 1, got {max_tenant_labels}")
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.block_size = block_size
        self.max_tenant_labels = max_tenant_labels
        self._tenants: set[str] = set()  # tenants with their own label (engine thread only)
        r = self.registry
        m, mt = ["model_name"], ["model_name", "tenant"]
        self.running = Gauge("quanta:num_requests_running", "Requests in the running batch.", m, registry=r)
        self.waiting = Gauge("quanta:num_requests_waiting", "Requests waiting to run.", m, registry=r)
        self.kv_usage = Gauge(
            "quanta:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", m, registry=r
        )
        self.prefix_queries = Counter(
            "quanta:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m, registry=r
        )
        self.prefix_hits = Counter(
            "quanta:prefix_cache_hits", "Prompt tokens found in the prefix cache.", m, registry=r
        )
        self.preemptions = Counter("quanta:num_preemptions", "Preemptions.", m, registry=r)
        # A cluster's instances (quanta serve --instances N), labelled by index.
        mi = ["model_name", "instance"]
        self.instance_up = Gauge("quanta:instance_up", "1 while the instance is alive.", mi, registry=r)
        self.instance_running = Gauge(
            "quanta:instance_num_requests_running", "Requests running on the instance.", mi, registry=r
        )
        self.instance_waiting = Gauge(
            "quanta:instance_num_requests_waiting", "Requests waiting on the instance.", mi, registry=r
        )
        self.instance_kv_usage = Gauge(
            "quanta:instance_kv_cache_usage_perc",
            "Fraction of the instance's KV blocks in use.",
            mi,
            registry=r,
        )
        self.migrations = Counter(
            "quanta:migrations",
            "Live migrations between instances, by outcome.",
            ["model_name", "outcome"],
            registry=r,
        )
        self.migration_downtime = Gauge(
            "quanta:migration_downtime_seconds",
            "Time a migrated request stood still (last stage to commit): mean and max so far.",
            ["model_name", "stat"],
            registry=r,
        )
        self.redispatched = Counter(
            "quanta:redispatched_requests",
            "Requests recomputed elsewhere after their instance died.",
            m,
            registry=r,
        )
        self._seen_cluster = {"migrations": 0, "migrations_aborted": 0, "redispatched": 0}
        self.prompt_tokens = Counter(
            "quanta:prompt_tokens", "Prompt tokens of finished requests.", mt, registry=r
        )
        self.generation_tokens = Counter("quanta:generation_tokens", "Generated tokens.", mt, registry=r)
        self.success = Counter(
            "quanta:request_success",
            "Finished requests by finish reason.",
            [*mt, "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "quanta:time_to_first_token_seconds",
            "Time to first token.",
            mt,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "quanta:inter_token_latency_seconds",
            "Time between tokens.",
            mt,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "quanta:request_time_per_output_token_seconds",
            "Mean time per output token of a request.",
            mt,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "quanta:e2e_request_latency_seconds",
            "Arrival to finish.",
            mt,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "quanta:request_queue_time_seconds",
            "Arrival to first scheduled.",
            mt,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self._seen_queries = self._seen_hits = self._seen_preemptions = 0
        self._counter_lock = threading.Lock()  # the engine thread (steps) and the scrape both add

    def attach(self, engine: EngineFrontend) -> None:
        engine.add_step_observer(self._on_core_step)

    def tenant_label(self, tenant: str) -> str:
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) < self.max_tenant_labels and tenant != OTHER_TENANT:
            self._tenants.add(tenant)
            return tenant
        return OTHER_TENANT

    def _on_core_step(self, out: StepOutput) -> None:
        """Engine thread, after each step: tokens, TTFT and inter-token gaps as they happen."""
        try:
            self._observe_tokens(out)
        except Exception:  # metrics must never stop the engine
            logger.exception("metrics observer failed")

    def _observe_tokens(self, out: StepOutput) -> None:
        name = self.model_name
        for req in out.updated:
            t = req.times
            tenant = self.tenant_label(req.tenant)
            self.generation_tokens.labels(name, tenant).inc()
            if len(t.tokens) == 1 and t.first_token is not None:
                self.ttft.labels(name, tenant).observe(t.first_token - t.arrival)
            elif len(t.tokens) > 1:
                self.itl.labels(name, tenant).observe(t.tokens[-1] - t.tokens[-2])

    def observe_outputs(self, engine: EngineFrontend, outputs: list[RequestOutput]) -> None:
        """Engine thread, after each step's outputs are processed (stop strings included)."""
        name = self.model_name
        self._observe_counters(engine.counters())
        for out in outputs:
            if out.finished:
                tenant = self.tenant_label(out.requests[0].tenant)
                self.prompt_tokens.labels(name, tenant).inc(len(out.prompt_token_ids))
                for req in out.requests:
                    self._observe_finished(req)

    def _observe_counters(self, c: CacheCounters) -> None:
        """Cumulative engine counters become Prometheus increments (blocks -> tokens, as vLLM counts
        tokens). After each step (engine thread) and at each scrape (a cluster's instances count
        between its steps, and after its last one)."""
        name, bs = self.model_name, self.block_size
        with self._counter_lock:
            queries = max(c.prefix_queries - self._seen_queries, 0)  # never backwards (a dead instance's)
            hits = max(c.prefix_hits - self._seen_hits, 0)
            preemptions = max(c.preemptions - self._seen_preemptions, 0)
            self.prefix_queries.labels(name).inc(queries * bs)
            self.prefix_hits.labels(name).inc(hits * bs)
            self.preemptions.labels(name).inc(preemptions)
            self._seen_queries += queries
            self._seen_hits += hits
            self._seen_preemptions += preemptions

    def observe_aborted(self, requests: list[Request], reason: str = "abort") -> None:
        """Engine thread: requests ended by an abort (client gone) or, with reason "error", a failed step."""
        for req in requests:
            self.success.labels(self.model_name, self.tenant_label(req.tenant), reason).inc()

    def _observe_finished(self, req: Request) -> None:
        labels = (self.model_name, self.tenant_label(req.tenant))
        m = RequestMetrics.of(req)
        self.success.labels(*labels, req.status.finish_reason or "unknown").inc()
        if m.tpot is not None:
            self.tpot.labels(*labels).observe(m.tpot)
        if m.e2e is not None:
            self.e2e.labels(*labels).observe(m.e2e)
        if m.scheduling_delay is not None:
            self.queue_time.labels(*labels).observe(m.scheduling_delay)

    def set_gauges(self, state: EngineState) -> None:
        name = self.model_name
        if state.counters is not None:
            self._observe_counters(state.counters)
        self.running.labels(name).set(state.num_running)
        self.waiting.labels(name).set(state.num_waiting)
        self.kv_usage.labels(name).set(state.kv_usage)
        for inst in state.instances or []:
            labels = (name, str(inst["index"]))
            self.instance_up.labels(*labels).set(1 if inst["alive"] else 0)
            self.instance_running.labels(*labels).set(inst.get("num_running", 0))
            self.instance_waiting.labels(*labels).set(inst.get("num_waiting", 0))
            self.instance_kv_usage.labels(*labels).set(inst.get("kv_usage", 0.0))
        c = state.cluster
        if c is not None:
            seen = self._seen_cluster
            self.migrations.labels(name, "committed").inc(c["migrations"] - seen["migrations"])
            self.migrations.labels(name, "aborted").inc(c["migrations_aborted"] - seen["migrations_aborted"])
            self.redispatched.labels(name).inc(c["redispatched"] - seen["redispatched"])
            seen.update((k, c[k]) for k in seen)
            for stat in ("mean", "max"):
                ms = c[f"migration_downtime_ms_{stat}"]
                if ms is not None:
                    self.migration_downtime.labels(name, stat).set(ms / 1e3)
