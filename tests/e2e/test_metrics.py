"""Request metrics recorded on the shared default server: token counters match the usage the client got,
latency histograms count each request, and finish reasons are labelled as the client saw them."""

from __future__ import annotations

import time

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
        "vllm:request_inference_time_seconds_count",
        "vllm:request_prefill_time_seconds_count",
        "vllm:request_params_n_count",
        "vllm:request_params_n_sum",
        "vllm:request_params_max_tokens_count",
        "vllm:request_params_max_tokens_sum",
        "vllm:request_num_preemptions_count",
        "vllm:request_num_preemptions_sum",
        "vllm:iteration_tokens_total_count",
        "vllm:iteration_tokens_total_sum",
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
    # Issue 16 item 10: vLLM's per-request parameter and phase histograms, one observation each.
    assert delta["vllm:request_inference_time_seconds_count"] == 2
    assert delta["vllm:request_prefill_time_seconds_count"] == 2
    assert delta["vllm:request_params_n_count"] == 2 and delta["vllm:request_params_n_sum"] == 2
    assert delta["vllm:request_params_max_tokens_count"] == 2
    assert delta["vllm:request_params_max_tokens_sum"] == 5 + 12
    assert delta["vllm:request_num_preemptions_count"] == 2 and delta["vllm:request_num_preemptions_sum"] == 0


def _wait_for_steps(url: str, before: dict[str, float], num_tokens: float) -> dict[str, float]:
    """Engine figures arrive with outputs and heartbeats: poll until the steps' tokens show."""
    deadline = time.monotonic() + 10
    while True:
        after = _totals(url)
        done = (
            after["vllm:iteration_tokens_total_sum"] - before["vllm:iteration_tokens_total_sum"] >= num_tokens
        )
        if done or time.monotonic() > deadline:
            return after
        time.sleep(0.2)


def test_parallel_samples_and_engine_step_metrics(default_server: ServerProcess) -> None:
    url = default_server.base_url
    before = _totals(url)
    body = {
        "model": DEFAULT_MODEL_NAME,
        "prompt": "Colours: red,",
        "max_tokens": 4,
        "n": 3,
        "ignore_eos": True,
    }
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    # Every sample reports its request's n, as vLLM's vllm:request_params_n does.
    after = _wait_for_steps(url, before, 3 * 4)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert delta["vllm:request_params_n_count"] == 3 and delta["vllm:request_params_n_sum"] == 9
    assert delta["vllm:request_params_max_tokens_sum"] == 3 * 4
    # vllm:iteration_tokens_total: tokens computed per step. The three samples share the prompt (prefix
    # cache) and the last sampled token of each is never fed back, so the sum is at least the decode
    # tokens and at most the prompts plus the decode tokens.
    generated, prompt = response["usage"]["completion_tokens"], response["usage"]["prompt_tokens"]
    assert 3 * (4 - 1) <= delta["vllm:iteration_tokens_total_sum"] <= 3 * prompt + generated
    assert 4 <= delta["vllm:iteration_tokens_total_count"] <= 3 * 4
    text = httpx.get(f"{url}/metrics", timeout=10).text
    waiting = metric_samples(text, "vllm:num_requests_waiting_by_reason")
    assert sorted(k.split('reason="')[1].split('"')[0] for k in waiting) == ["capacity", "deferred"]
    assert all(v == 0 for v in waiting.values())  # idle again
    (info,) = metric_samples(text, "vllm:cache_config_info")
    engine = httpx.get(f"{url}/load", timeout=10).json()["engines"][0]
    assert f'num_gpu_blocks="{engine["num_kv_blocks"]}"' in info and 'enable_prefix_caching="True"' in info
