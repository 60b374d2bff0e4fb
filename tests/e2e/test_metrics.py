"""Request metrics recorded on the shared default server: token counters match the usage the client got,
latency histograms count each request, and finish reasons are labelled as the client saw them."""

from __future__ import annotations

import httpx

from tests.conftest import DEFAULT_MODEL_NAME
from tests.e2e.test_scale_out import metric_samples
from tests.server_process import ServerProcess


def _totals(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = {}
    for name in (
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:request_prompt_tokens_count",
        "vllm:request_prompt_tokens_sum",
        "vllm:request_generation_tokens_count",
        "vllm:request_generation_tokens_sum",
        "vllm:request_decode_time_seconds_count",
        "vllm:request_queue_time_seconds_count",
    ):
        out[name] = sum(metric_samples(text, name).values())
    for label, value in metric_samples(text, "vllm:request_success_total").items():
        reason = label.split('finished_reason="')[1].split('"')[0]
        out[reason] = out.get(reason, 0.0) + value
    return out


def test_request_metrics_match_what_clients_received(default_server: ServerProcess) -> None:
    url = default_server.base_url
    before = _totals(url)
    length = httpx.post(
        f"{url}/v1/completions",
        json={"model": DEFAULT_MODEL_NAME, "prompt": "Count: 1, 2, 3,", "max_tokens": 5, "ignore_eos": True},
        timeout=120,
    ).json()
    # A stop string that the greedy answer is sure to contain ends the request early in the API process.
    stopped = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": DEFAULT_MODEL_NAME,
            "prompt": "Count: 1, 2, 3,",
            "max_tokens": 12,
            "temperature": 0,
            "stop": [","],
        },
        timeout=120,
    ).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    after = _totals(url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert delta["length"] == 1 and delta["stop"] == 1
    assert (
        delta["vllm:prompt_tokens_total"]
        == length["usage"]["prompt_tokens"] + stopped["usage"]["prompt_tokens"]
    )
    # The engine may have produced a token or two past the stop string before the abort reached it,
    # but never fewer than the client was billed for.
    assert delta["vllm:generation_tokens_total"] >= 5 + stopped["usage"]["completion_tokens"]
    assert delta["vllm:time_to_first_token_seconds_count"] == 2
    assert delta["vllm:e2e_request_latency_seconds_count"] == 2
    assert delta["vllm:inter_token_latency_seconds_count"] >= 4
    # Per-request histograms: one observation per request, sums equal to the counters above.
    assert delta["vllm:request_prompt_tokens_count"] == delta["vllm:request_generation_tokens_count"] == 2
    assert delta["vllm:request_prompt_tokens_sum"] == delta["vllm:prompt_tokens_total"]
    assert delta["vllm:request_generation_tokens_sum"] == delta["vllm:generation_tokens_total"]
    assert delta["vllm:request_decode_time_seconds_count"] == 2
    assert delta["vllm:request_queue_time_seconds_count"] == 2  # measured by the engine
