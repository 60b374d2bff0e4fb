"""Prometheus metrics with vLLM's names, so existing vLLM dashboards work against Tandem.

Engine-side figures (running, waiting, KV usage, prefix cache, preemptions) come from the stats each
engine sends with its outputs and heartbeats; every API process sees the same figures, so only the
process answering the scrape reports them (never summed). Request-side figures are recorded as requests
finish and, with FrontendConfig.metrics_dir set (from PROMETHEUS_MULTIPROC_DIR, which the launcher
sets), summed over all API processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from frontend.engine_client import RequestTiming
    from frontend.state import AppState

_LATENCY_BUCKETS = (
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
)


# Token-count buckets as vLLM builds them: 1, 2, 5, 10, 20, 50, ... up to the model's context length.
def _token_buckets(max_model_len: int) -> tuple[float, ...]:
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return (*buckets, float("inf"))
            buckets.append(float(value))
        exponent += 1


class RequestMetrics:
    """Per-request histograms and counters, labelled by model and the engine that served the request."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int = 2048) -> None:
        self.model_name = model_name
        labels = ["model_name", "engine"]
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=registry
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", labels, registry=registry
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=registry,
        )

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, documentation, labels, buckets=buckets, registry=registry)

        token_buckets = _token_buckets(max_model_len)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between tokens.", _LATENCY_BUCKETS)
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS
        )
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per finished request.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generated tokens per finished request.", token_buckets
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited in the engine before it was first scheduled.",
            _LATENCY_BUCKETS,
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds", "From a request's first token to its last.", _LATENCY_BUCKETS
        )

    def record_request(self, timing: RequestTiming, finished_at: float) -> None:
        labels = (self.model_name, timing.engine)
        self.prompt_tokens.labels(*labels).inc(timing.num_prompt_tokens)
        self.generation_tokens.labels(*labels).inc(timing.num_generation_tokens)
        self.request_success.labels(*labels, timing.finish_reason).inc()
        self.e2e.labels(*labels).observe(max(finished_at - timing.arrival_time, 0.0))
        self.request_prompt_tokens.labels(*labels).observe(timing.num_prompt_tokens)
        self.request_generation_tokens.labels(*labels).observe(timing.num_generation_tokens)
        if timing.queue_time_s is not None:
            self.queue_time.labels(*labels).observe(max(timing.queue_time_s, 0.0))
        if timing.first_token_at is not None:
            self.ttft.labels(*labels).observe(max(timing.first_token_at - timing.arrival_time, 0.0))
            last = timing.last_token_at if timing.last_token_at is not None else timing.first_token_at
            self.decode_time.labels(*labels).observe(max(last - timing.first_token_at, 0.0))
        itl = self.itl.labels(*labels)
        for gap in timing.inter_token_s:
            itl.observe(gap)


class EngineStatsCollector:
    """Reads the latest stats each engine reported; nothing is stored twice."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests running on the engine.", labels=labels
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting on the engine.", labels=labels
        )
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full).", labels=labels)
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=labels
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=labels
        )
        preempt = CounterMetricFamily("vllm:num_preemptions", "Preemptions.", labels=labels)
        max_seqs = GaugeMetricFamily(
            "tandem:max_step_num_seqs", "Largest number of sequences in one engine step.", labels=labels
        )
        alive = GaugeMetricFamily("tandem:engine_alive", "1 while the engine is live.", labels=labels)
        model = self.state.ctx.model_name if self.state.ctx else ""
        for conn in self.state.client.engines:
            lv = [model, conn.ready.engine_id if conn.ready else conn.address]
            alive.add_metric(lv, 1.0 if conn.alive else 0.0)
            s = conn.stats
            if s is None:
                continue
            running.add_metric(lv, s.num_running)
            waiting.add_metric(lv, s.num_waiting)
            kv.add_metric(lv, s.kv_cache_usage)
            queries.add_metric(lv, s.prefix_cache_queries)
            hits.add_metric(lv, s.prefix_cache_hits)
            preempt.add_metric(lv, s.num_preemptions)
            max_seqs.add_metric(lv, s.max_step_num_seqs)
        yield from (running, waiting, kv, queries, hits, preempt, max_seqs, alive)


def setup_metrics(state: AppState) -> None:
    """The scrape registry; request metrics are attached once the model name is known (start_request_metrics)."""
    registry = CollectorRegistry()
    multiproc_dir = state.config.metrics_dir
    if multiproc_dir:
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry, path=multiproc_dir)
    registry.register(EngineStatsCollector(state))
    state.extras["registry"] = registry


def start_request_metrics(state: AppState, model_name: str, max_model_len: int = 2048) -> RequestMetrics:
    """Creates the request metrics and has the engine client record into them."""
    registry = state.extras["registry"]
    # In multi-process mode the values live in files that MultiProcessCollector reads back, so the
    # metric objects must not be registered for scraping a second time.
    target = CollectorRegistry() if state.config.metrics_dir else registry
    metrics = RequestMetrics(target, model_name, max_model_len)  # type: ignore[arg-type]
    state.extras["request_metrics"] = metrics
    state.client.metrics = metrics
    return metrics


def request_metrics(state: AppState) -> RequestMetrics | None:
    return state.extras.get("request_metrics")  # type: ignore[return-value]


def render_metrics(state: AppState) -> tuple[bytes, str]:
    registry = state.extras["registry"]
    return generate_latest(registry), CONTENT_TYPE_LATEST  # type: ignore[arg-type]
