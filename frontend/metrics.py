"""Prometheus metrics with vLLM's names, so existing vLLM dashboards work against Tandem.

Engine-side figures (running, waiting, KV usage, prefix cache, preemptions) come from the stats each
engine sends with its outputs and heartbeats; every API process sees the same figures, so only the
process answering the scrape reports them (never summed). Request-side figures are recorded as requests
finish and, with FrontendConfig.metrics_dir set (from PROMETHEUS_MULTIPROC_DIR, which the launcher
sets), summed over all API processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocol.messages import ITERATION_TOKENS_BUCKETS, Ready, SchedulerStats

if TYPE_CHECKING:
    from frontend.engine_client import EngineConnection, RequestTiming
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


# vLLM's buckets for `n` and for preemptions per request.
_N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)
_PREEMPTION_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0)
# Every finish reason a request can be counted under, so each series exists (at zero) from start-up.
FINISHED_REASONS = ("stop", "length", "abort", "error")


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
        # "Inference" runs from first scheduled to finished, "prefill" from first scheduled to the first
        # token. The engine reports the queue time, so first scheduled = arrival + queue time.
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Time a request spent running: from first scheduled to finished.",
            _LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Time from a request's first scheduling to its first token.",
            _LATENCY_BUCKETS,
        )
        self.params_n = histogram("vllm:request_params_n", "The n request parameter.", _N_BUCKETS)
        self.params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "The max_tokens request parameter.", token_buckets
        )
        self.num_preemptions = histogram(
            "vllm:request_num_preemptions", "Preemptions per finished request.", _PREEMPTION_BUCKETS
        )
        self._labelled = [
            self.prompt_tokens,
            self.generation_tokens,
            self.ttft,
            self.itl,
            self.e2e,
            self.request_prompt_tokens,
            self.request_generation_tokens,
            self.queue_time,
            self.decode_time,
            self.inference_time,
            self.prefill_time,
            self.params_n,
            self.params_max_tokens,
            self.num_preemptions,
        ]
        self._engines_seen: set[str] = set()
        self._series_cache: dict[tuple[str, str], _Series] = {}

    def ensure_series(self, engine: str, model_name: str | None = None) -> None:
        """Creates every series of an engine at zero, so dashboards and alerts see 0 before the first
        request instead of "no data" (in multi-process mode the zeros are written to the shared files)."""
        if engine in self._engines_seen:
            return
        self._engines_seen.add(engine)
        labels = (model_name or self.model_name, engine)
        for metric in self._labelled:
            metric.labels(*labels)
        for reason in FINISHED_REASONS:
            self.request_success.labels(*labels, reason)

    def _series(self, model_name: str, engine: str) -> _Series:
        """One (model, engine)'s children, looked up once: `labels()` validates and locks on every call,
        14 times per request otherwise."""
        key = (model_name, engine)
        series = self._series_cache.get(key)
        if series is None:
            success = {r: self.request_success.labels(*key, r) for r in FINISHED_REASONS}
            children: list[Any] = [metric.labels(*key) for metric in self._labelled]
            series = _Series._make([*children, success])
            self._series_cache[key] = series
        return series

    def record_request(self, timing: RequestTiming, finished_at: float) -> None:
        s = self._series(timing.model_name or self.model_name, timing.engine)
        s.prompt_tokens.inc(timing.num_prompt_tokens)
        s.generation_tokens.inc(timing.num_generation_tokens)
        success = s.request_success.get(timing.finish_reason)
        if success is None:  # not one of FINISHED_REASONS: its own series, as before
            key = (timing.model_name or self.model_name, timing.engine, timing.finish_reason)
            success = self.request_success.labels(*key)
        success.inc()
        s.e2e.observe(max(finished_at - timing.arrival_time, 0.0))
        s.request_prompt_tokens.observe(timing.num_prompt_tokens)
        s.request_generation_tokens.observe(timing.num_generation_tokens)
        s.params_n.observe(timing.n)
        s.params_max_tokens.observe(timing.max_tokens)
        s.num_preemptions.observe(timing.num_preemptions)
        if timing.queue_time_s is not None:
            s.queue_time.observe(max(timing.queue_time_s, 0.0))
            first_scheduled = timing.arrival_time + timing.queue_time_s
            s.inference_time.observe(max(finished_at - first_scheduled, 0.0))
            if timing.first_token_at is not None:
                s.prefill_time.observe(max(timing.first_token_at - first_scheduled, 0.0))
        if timing.first_token_at is not None:
            s.ttft.observe(max(timing.first_token_at - timing.arrival_time, 0.0))
            last = timing.last_token_at if timing.last_token_at is not None else timing.first_token_at
            s.decode_time.observe(max(last - timing.first_token_at, 0.0))
        for gap in timing.inter_token_s:
            s.itl.observe(gap)


class _Series(NamedTuple):
    """RequestMetrics' children for one (model, engine), in the order of RequestMetrics._labelled."""

    prompt_tokens: Any
    generation_tokens: Any
    ttft: Any
    itl: Any
    e2e: Any
    request_prompt_tokens: Any
    request_generation_tokens: Any
    queue_time: Any
    decode_time: Any
    inference_time: Any
    prefill_time: Any
    params_n: Any
    params_max_tokens: Any
    num_preemptions: Any
    request_success: dict[str, Any]  # by finish reason


def engine_label(conn: EngineConnection) -> str:
    """The `engine` label of a connection's series: its id once it has answered, else its address."""
    return conn.ready.engine_id if conn.ready else conn.address


def model_label(state: AppState, conn: EngineConnection) -> str:
    """The `model_name` label of an engine's series: the name its model is served under."""
    ctx = state.models.models.get(conn.group) if conn.group is not None else None
    if ctx is None:
        ctx = state.ctx
    return ctx.model_name if ctx is not None else ""


class EngineStatsCollector:
    """Reads the latest stats each engine reported; nothing is stored twice. An engine that has not
    reported stats yet shows zeros, so every series exists from start-up."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests running on the engine.", labels=labels
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting on the engine.", labels=labels
        )
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Waiting requests by why they wait: capacity, or deferred (a grammar still compiling).",
            labels=[*labels, "reason"],
        )
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full).", labels=labels)
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=labels
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=labels
        )
        preempt = CounterMetricFamily("vllm:num_preemptions", "Preemptions.", labels=labels)
        drafts = CounterMetricFamily(
            "vllm:spec_decode_num_draft_tokens", "Speculative draft tokens checked.", labels=labels
        )
        accepted = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.", labels=labels
        )
        iteration = HistogramMetricFamily(
            "vllm:iteration_tokens_total", "Tokens scheduled per engine step.", labels=labels
        )
        cache_info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "The KV cache's configuration, in the labels (value 1).",
            labels=list(_CACHE_INFO_LABELS),
        )
        max_seqs = GaugeMetricFamily(
            "tandem:max_step_num_seqs", "Largest number of sequences in one engine step.", labels=labels
        )
        alive = GaugeMetricFamily("tandem:engine_alive", "1 while the engine is live.", labels=labels)
        for conn in self.state.client.engines:
            lv = [model_label(self.state, conn), engine_label(conn)]
            alive.add_metric(lv, 1.0 if conn.alive else 0.0)
            if conn.ready is not None:
                cache_info.add_metric(_cache_info_values(conn.ready), 1.0)
            s = conn.stats or SchedulerStats(num_running=0, num_waiting=0, kv_cache_usage=0.0)
            running.add_metric(lv, s.num_running)
            waiting.add_metric(lv, s.num_waiting)
            by_reason.add_metric([*lv, "capacity"], s.num_waiting - s.num_waiting_deferred)
            by_reason.add_metric([*lv, "deferred"], s.num_waiting_deferred)
            kv.add_metric(lv, s.kv_cache_usage)
            queries.add_metric(lv, s.prefix_cache_queries)
            hits.add_metric(lv, s.prefix_cache_hits)
            preempt.add_metric(lv, s.num_preemptions)
            drafts.add_metric(lv, s.spec_decode_num_draft_tokens)
            accepted.add_metric(lv, s.spec_decode_num_accepted_tokens)
            iteration.add_metric(lv, _iteration_buckets(s.iteration_tokens_counts), s.iteration_tokens_sum)
            max_seqs.add_metric(lv, s.max_step_num_seqs)
        yield from (running, waiting, by_reason, kv, queries, hits, preempt, iteration, cache_info)
        yield from (drafts, accepted, max_seqs, alive)


# vllm:cache_config_info's labels (vLLM's names; no model_name, as in vLLM).
_CACHE_INFO_LABELS = (
    "engine",
    "block_size",
    "num_gpu_blocks",
    "kv_cache_size_tokens",
    "cache_dtype",
    "enable_prefix_caching",
)


def _cache_info_values(ready: Ready) -> list[str]:
    num_tokens = ready.num_kv_blocks * ready.block_size
    return [
        ready.engine_id,
        str(ready.block_size),
        str(ready.num_kv_blocks),
        str(num_tokens),
        ready.model_dtype,
        str(ready.enable_prefix_caching),
    ]


def _iteration_buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs from the engine's per-bucket step counts (all zero before any)."""
    counts = counts or [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
    bounds = [str(float(b)) for b in ITERATION_TOKENS_BUCKETS] + ["+Inf"]
    total, out = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        out.append((bound, float(total)))
    return out


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
    for conn in state.client.engines:
        if conn.ready is not None:
            metrics.ensure_series(conn.ready.engine_id, model_label(state, conn))
    state.extras["request_metrics"] = metrics
    state.client.metrics = metrics
    return metrics


def request_metrics(state: AppState) -> RequestMetrics | None:
    return state.extras.get("request_metrics")  # type: ignore[return-value]


def render_metrics(state: AppState) -> tuple[bytes, str]:
    registry = state.extras["registry"]
    metrics = request_metrics(state)
    if metrics is not None:  # engines that answered since the last scrape get their zero series
        for conn in state.client.engines:
            if conn.ready is not None:
                metrics.ensure_series(conn.ready.engine_id, model_label(state, conn))
    return generate_latest(registry), CONTENT_TYPE_LATEST  # type: ignore[arg-type]
