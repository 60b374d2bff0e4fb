"""frontend/metrics.py on its own (no processes): how engine stats and finished requests become vLLM's
series, every series at zero before the first request, and the derived phase times."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer, models

from frontend.config import FrontendConfig
from frontend.engine_client import EngineClient, RequestTiming
from frontend.metrics import render_metrics, setup_metrics, start_request_metrics
from frontend.state import AppState
from protocol.messages import ITERATION_TOKENS_BUCKETS, Ready, SchedulerStats


def _ready(engine_id: str) -> Ready:
    vocab = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()
    return Ready(
        engine_id, ["m"], 4096, 2, 33, 16, vocab, None, None, None, [], False, model_dtype="bfloat16"
    )


def _samples(state: AppState) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _content_type = render_metrics(state)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    found = [v for (n, lv), v in samples.items() if n == name and set(labels.items()) <= set(lv)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> Iterator[AppState]:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    client = EngineClient(["ipc:///nowhere-0", "ipc:///nowhere-1"])
    state = AppState(
        config=FrontendConfig(engine_addresses=("ipc:///nowhere-0", "ipc:///nowhere-1")), client=client
    )
    setup_metrics(state)
    for i, conn in enumerate(client.engines):
        conn.ready, conn.alive = _ready(f"engine-{i}"), True
        conn.group = conn.ready.served_model_names[0]
        state.models.update(conn, client.engines)
    start_request_metrics(state, "m", 4096)
    yield state
    client.ctx.destroy(linger=0)  # no socket was ever opened


def test_engine_stats_become_vllm_series(state: AppState) -> None:
    counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
    counts[0], counts[3], counts[-1] = 5, 2, 1  # five 1-token steps, two of 17-32, one over 16384
    state.client.engines[0].stats = SchedulerStats(
        num_running=2,
        num_waiting=3,
        kv_cache_usage=0.5,
        num_waiting_deferred=1,
        iteration_tokens_counts=counts,
        iteration_tokens_sum=20_000,
        spec_decode_num_draft_tokens=12,
        spec_decode_num_accepted_tokens=7,
    )
    samples = _samples(state)
    e0 = {"model_name": "m", "engine": "engine-0"}
    assert _value(samples, "vllm:num_requests_waiting_by_reason", **e0, reason="capacity") == 2
    assert _value(samples, "vllm:num_requests_waiting_by_reason", **e0, reason="deferred") == 1
    bucket = "vllm:iteration_tokens_total_bucket"
    assert _value(samples, bucket, **e0, le="1.0") == 5
    assert _value(samples, bucket, **e0, le="16.0") == 5
    assert _value(samples, bucket, **e0, le="32.0") == 7
    assert _value(samples, bucket, **e0, le="16384.0") == 7
    assert _value(samples, bucket, **e0, le="+Inf") == 8
    assert _value(samples, "vllm:iteration_tokens_total_count", **e0) == 8
    assert _value(samples, "vllm:iteration_tokens_total_sum", **e0) == 20_000
    assert _value(samples, "vllm:spec_decode_num_draft_tokens_total", **e0) == 12
    assert _value(samples, "vllm:spec_decode_num_accepted_tokens_total", **e0) == 7
    info = _value(samples, "vllm:cache_config_info", engine="engine-1")
    assert info == 1
    (labels,) = [
        dict(lv) for (n, lv) in samples if n == "vllm:cache_config_info" and ("engine", "engine-1") in lv
    ]
    assert labels == {
        "engine": "engine-1",
        "block_size": "16",
        "num_gpu_blocks": "33",
        "kv_cache_size_tokens": "528",
        "cache_dtype": "bfloat16",
        "enable_prefix_caching": "True",
    }


def test_every_series_exists_at_zero_before_any_request(state: AppState) -> None:
    samples = _samples(state)
    for engine in ("engine-0", "engine-1"):  # engine-1 never reported stats
        e = {"model_name": "m", "engine": engine}
        for name in (
            "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc",
            "vllm:iteration_tokens_total_count",
            "vllm:time_to_first_token_seconds_count",
            "vllm:request_inference_time_seconds_count",
            "vllm:request_prefill_time_seconds_count",
            "vllm:request_params_n_count",
            "vllm:request_params_max_tokens_count",
            "vllm:request_num_preemptions_count",
            "vllm:prompt_tokens_total",
        ):
            assert _value(samples, name, **e) == 0, name
        for reason in ("stop", "length", "abort", "error"):
            assert _value(samples, "vllm:request_success_total", **e, finished_reason=reason) == 0


def test_a_finished_request_fills_the_parameter_and_phase_histograms(state: AppState) -> None:
    timing = RequestTiming(
        arrival_time=100.0,
        engine="engine-0",
        num_prompt_tokens=7,
        num_generation_tokens=4,
        first_token_at=101.0,
        last_token_at=102.5,
        finish_reason="length",
        queue_time_s=0.5,
        max_tokens=4,
        n=3,
        num_preemptions=2,
    )
    state.client.metrics.record_request(timing, finished_at=103.0)  # type: ignore[union-attr]
    samples = _samples(state)
    e0 = {"model_name": "m", "engine": "engine-0"}
    # First scheduled = arrival + the engine's queue time = 100.5.
    assert _value(samples, "vllm:request_inference_time_seconds_sum", **e0) == pytest.approx(2.5)
    assert _value(samples, "vllm:request_prefill_time_seconds_sum", **e0) == pytest.approx(0.5)
    assert _value(samples, "vllm:request_params_n_bucket", **e0, le="2.0") == 0
    assert _value(samples, "vllm:request_params_n_bucket", **e0, le="5.0") == 1
    assert _value(samples, "vllm:request_params_max_tokens_sum", **e0) == 4
    assert _value(samples, "vllm:request_num_preemptions_bucket", **e0, le="1.0") == 0
    assert _value(samples, "vllm:request_num_preemptions_bucket", **e0, le="2.0") == 1
    assert _value(samples, "vllm:request_success_total", **e0, finished_reason="length") == 1
