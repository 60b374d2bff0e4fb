"""Issue 9 acceptance on one box: 2 API processes sharing one port in front of 2 engines (`tandem serve
--api-server-count 2 --data-parallel-size 2`): load spread over both engines, metrics summed over the
API processes, and clients that disconnect (streaming or not) leave every KV block free."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess, serve

NUM_ENGINES = 2
STARTUP_METRICS: dict[int, list[str]] = {}  # port -> /metrics bodies scraped before the first request


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = serve(
        [
            "--api-server-count",
            "2",
            "--data-parallel-size",
            str(NUM_ENGINES),
            "--kv-cache-memory",
            "256M",
            "--num-threads",
            "1",
            "--max-model-len",
            "1024",
            "--max-tool-argument-chars",
            "8",
        ]
    )
    # /health answers once one engine is up; these tests want both.
    wait_for_engines(proc.base_url, lambda e: e["alive"] and e["num_free_blocks"] is not None)
    # Before any request: a fresh connection per scrape, so both API processes get asked.
    STARTUP_METRICS[proc.port] = [httpx.get(f"{proc.base_url}/metrics", timeout=10).text for _ in range(8)]
    yield proc
    proc.stop()


def wait_for_engines(base_url: str, predicate, timeout_s: float = 180.0) -> list[dict]:  # noqa: ANN001
    """Polls /load (several times, so both API processes are asked) until every engine satisfies it."""
    deadline = time.monotonic() + timeout_s
    engines: list[dict] = []
    num_ok = 0
    while time.monotonic() < deadline:
        engines = httpx.get(f"{base_url}/load", timeout=5).json()["engines"]
        num_ok = num_ok + 1 if engines and all(predicate(e) for e in engines) else 0
        if num_ok >= 4:
            return engines
        time.sleep(0.25)
    raise TimeoutError(f"engines never reached the expected state: {engines}")


def all_blocks_free(engine: dict) -> bool:
    return (
        engine["num_running"] == 0
        and engine["num_waiting"] == 0
        and engine["num_free_blocks"] == engine["num_kv_blocks"] - 1  # block 0 is the reserved null block
    )


def metric_samples(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric family's samples in a Prometheus text body."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def per_engine(samples: dict[str, float], **labels: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for label_text, value in samples.items():
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            engine = re.search(r'engine="([^"]+)"', label_text).group(1)  # type: ignore[union-attr]
            totals[engine] = totals.get(engine, 0.0) + value
    return totals


# Labelled series dashboards and alerts read; each must exist (at zero) before the first request.
STARTUP_ZERO_SERIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting_by_reason",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:iteration_tokens_total_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:request_queue_time_seconds_count",
    "vllm:request_inference_time_seconds_count",
    "vllm:request_prefill_time_seconds_count",
    "vllm:request_decode_time_seconds_count",
    "vllm:request_prompt_tokens_count",
    "vllm:request_generation_tokens_count",
    "vllm:request_params_n_count",
    "vllm:request_params_max_tokens_count",
    "vllm:request_num_preemptions_count",
)


def test_every_series_exists_at_zero_from_start_up(server: ServerProcess) -> None:
    """Issue 16 item 10: with --api-server-count 2, every scrape before the first request (whichever API
    process answers it) already has each series for each engine, at zero, so dashboards show 0 and
    not "no data"; vllm:cache_config_info describes each engine's KV cache."""
    engines = {e["engine_id"]: e for e in httpx.get(f"{server.base_url}/load", timeout=5).json()["engines"]}
    assert len(engines) == NUM_ENGINES
    for text in STARTUP_METRICS[server.port]:
        for name in STARTUP_ZERO_SERIES:
            samples = metric_samples(text, name)
            assert set(per_engine(samples)) == set(engines), (name, samples)
            assert all(v == 0 for v in samples.values()), (name, samples)
        reasons = metric_samples(text, "vllm:request_success_total")
        assert {r.split('finished_reason="')[1].split('"')[0] for r in reasons} >= {"stop", "length", "abort"}
        waiting = metric_samples(text, "vllm:num_requests_waiting_by_reason")
        assert {r.split('reason="')[1].split('"')[0] for r in waiting} == {"capacity", "deferred"}
        info = metric_samples(text, "vllm:cache_config_info")
        assert len(info) == NUM_ENGINES and all(v == 1 for v in info.values())
        for labels in info:
            engine = engines[re.search(r'engine="([^"]+)"', labels).group(1)]  # type: ignore[union-attr]
            assert f'num_gpu_blocks="{engine["num_kv_blocks"]}"' in labels and 'block_size="' in labels
    # Off by default (this server has no --enable-tokenizer-info-endpoint), as in vLLM.
    assert httpx.get(f"{server.base_url}/tokenizer_info", timeout=5).status_code == 404


def test_forced_tool_call_strings_are_bounded_by_the_flag(server: ServerProcess) -> None:
    """Issue 16 item 15: --max-tool-argument-chars 8 bounds a string the tool leaves open, so forced
    calls at temperature 1 close instead of running to max_tokens."""
    tool = {
        "type": "function",
        "function": {
            "name": "write_note",
            "parameters": {
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
            },
        },
    }
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": "Write a long note about Paris."}],
        "tools": [tool],
        "temperature": 1.0,
        "max_tokens": 60,
        "n": 6,
        "parallel_tool_calls": False,  # one call per choice: the bound, not the number of calls, is tested
    }
    for tool_choice in ("required", {"type": "function", "function": {"name": "write_note"}}):
        response = httpx.post(
            f"{server.base_url}/v1/chat/completions", json={**body, "tool_choice": tool_choice}, timeout=300
        )
        assert response.status_code == 200, response.text
        for choice in response.json()["choices"]:
            assert choice["finish_reason"] == "tool_calls", choice
            (call,) = choice["message"]["tool_calls"]
            assert len(json.loads(call["function"]["arguments"])["text"]) <= 8


def test_64_concurrent_requests_use_both_engines_and_metrics_sum_over_api_processes(
    server: ServerProcess,
) -> None:
    def successes() -> dict[str, float]:
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        return per_engine(metric_samples(text, "vllm:request_success_total"), finished_reason="length")

    before = successes()

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(
                *[
                    client.post(
                        f"{server.base_url}/v1/completions",
                        json={
                            "model": DEFAULT_MODEL_NAME,
                            "prompt": f"Request number {i} says",
                            "max_tokens": 3,
                            "ignore_eos": True,
                        },
                    )
                    for i in range(64)
                ]
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 64
    assert all(r.json()["usage"]["completion_tokens"] == 3 for r in responses)
    after = successes()
    served = {engine: after.get(engine, 0) - before.get(engine, 0) for engine in after}
    # Whichever API process answers the scrape reports every API process's requests.
    assert sum(served.values()) == 64
    assert len(served) == NUM_ENGINES and all(n > 0 for n in served.values()), served
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    # Engine gauges appear once per engine, never summed over API processes.
    assert len(metric_samples(text, "vllm:num_requests_running")) == NUM_ENGINES
    ttft = per_engine(metric_samples(text, "vllm:time_to_first_token_seconds_count"))
    assert sum(ttft.values()) >= 64


def test_200_streams_disconnected_mid_generation_free_every_kv_block(server: ServerProcess) -> None:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }

    async def read_one_token_then_leave(client: httpx.AsyncClient) -> bool:
        async with client.stream("POST", f"{server.base_url}/v1/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    return True  # leaving the block closes the connection mid-generation
        return False

    async def run() -> list[bool]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*[read_one_token_then_leave(client) for _ in range(200)])

    got_tokens = asyncio.run(run())
    assert all(got_tokens)
    engines = wait_for_engines(server.base_url, all_blocks_free, timeout_s=60)
    assert all(e["kv_cache_usage"] == 0.0 for e in engines)


def test_non_streaming_client_that_disconnects_aborts_its_request(server: ServerProcess) -> None:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "prompt": "Once upon a time",
        "max_tokens": 900,
        "ignore_eos": True,
    }

    def num_aborted() -> float:
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        return sum(
            per_engine(metric_samples(text, "vllm:request_success_total"), finished_reason="abort").values()
        )

    before = num_aborted()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=2.0)
    # 900 tokens take far longer than this on CPU (over half a minute on one thread): only an abort explains an
    # idle engine.
    wait_for_engines(server.base_url, all_blocks_free, timeout_s=10)
    assert num_aborted() == before + 1  # it did reach an engine, and ended as an abort


def test_metrics_use_vllm_names_and_version_answers(server: ServerProcess) -> None:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_success_total",
    ):
        samples = metric_samples(text, name)
        assert samples, f"{name} missing"
        assert all(f'model_name="{DEFAULT_MODEL_NAME}"' in k and 'engine="' in k for k in samples)
    version = httpx.get(f"{server.base_url}/version", timeout=5).json()["version"]
    assert version == importlib.metadata.version("tandem")  # from the package metadata, not a literal
