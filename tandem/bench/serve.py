"""`tandem bench serve`: a streaming load test of any OpenAI-compatible server (Tandem, vLLM, llama.cpp)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import TYPE_CHECKING, Any

from tandem.bench.stats import RequestResult

if TYPE_CHECKING:
    import httpx

    from tandem.bench.datasets import SampleRequest, TokenCounter


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="Server root (without /v1).")
    p.add_argument("--model", default=None, help="Model name to request; default: the first in /v1/models.")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions", help="API to call.")
    p.add_argument("--api-key", default=None, help="Bearer token (default: $OPENAI_API_KEY if set).")
    p.add_argument(
        "--dataset",
        choices=["random", "jsonl", "shared-prefix"],
        default="random",
        help="Where prompts come from.",
    )
    p.add_argument("--dataset-path", default=None, help="JSONL prompt file for --dataset jsonl.")
    p.add_argument("--num-prompts", type=int, default=100, help="Requests to send.")
    p.add_argument(
        "--random-input-len",
        type=int,
        default=256,
        help="Prompt tokens (random); suffix tokens (shared-prefix).",
    )
    p.add_argument(
        "--random-output-len",
        type=int,
        default=64,
        help="Output tokens per request (JSONL lines may override).",
    )
    p.add_argument("--prefix-len", type=int, default=256, help="Shared prefix tokens (shared-prefix).")
    p.add_argument("--num-prefixes", type=int, default=4, help="Distinct shared prefixes (shared-prefix).")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer.json (or its folder) to size random prompts exactly."
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Requests per second, Poisson arrivals; inf: all at once.",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight at once.")
    p.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature of every request.")
    p.add_argument("--seed", type=int, default=0, help="Seed for prompts and arrival times.")
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds one request may take.")
    p.add_argument("--result-json", default=None, help="Write the summary and per-request metrics here.")
    p.add_argument("--plot", default=None, help="Draw latency histograms into this PNG (needs matplotlib).")
    p.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")


def _payload(args: argparse.Namespace, model: str, sample: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": sample.output_len,
        "temperature": args.temperature,
        # Fixed output lengths: without this a model that stops early makes the numbers incomparable.
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    return body


def _chunk_text(chunk: dict[str, Any], endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], endpoint: str, sample: SampleRequest
) -> RequestResult:
    """One streaming request; records when each piece of text arrived."""
    result = RequestResult(success=False, prompt_len=sample.prompt_len)
    start = last = time.perf_counter()
    num_chunks = 0
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return result
                usage = chunk.get("usage") or usage
                if _chunk_text(chunk, endpoint):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
    except Exception as exc:  # any transport or decoding failure counts as a failed request
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_len = num_chunks
    if usage:
        result.output_len = int(usage.get("completion_tokens") or num_chunks)
        result.prompt_len = int(usage.get("prompt_tokens") or sample.prompt_len)
    result.success = result.ttft is not None or result.output_len > 0
    if not result.success:
        result.error = "the stream ended without any text"
    return result


async def _pick_model(client: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    if model:
        return model
    resp = await client.get(base_url + "/v1/models", timeout=10.0)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def _token_counter(client: httpx.AsyncClient, args: argparse.Namespace, model: str) -> TokenCounter:
    from tandem.bench.datasets import local_counter, server_counter, word_counter

    if args.tokenizer:
        return local_counter(args.tokenizer)
    return await server_counter(client, args.base_url, model) or word_counter()


def _samples(args: argparse.Namespace, counter: TokenCounter) -> list[SampleRequest]:
    from tandem.bench import datasets

    rng = random.Random(args.seed)
    if args.dataset == "jsonl":
        return datasets.jsonl_requests(args.dataset_path, counter, args.num_prompts, args.random_output_len)
    if args.dataset == "shared-prefix":
        return datasets.shared_prefix_requests(
            rng,
            counter,
            args.num_prompts,
            num_prefixes=args.num_prefixes,
            prefix_len=args.prefix_len,
            suffix_len=args.random_input_len,
            output_len=args.random_output_len,
        )
    return datasets.random_requests(
        rng, counter, args.num_prompts, args.random_input_len, args.random_output_len
    )


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Sends every request, then returns the result dict (summary + per-request metrics)."""
    import httpx
    from tqdm import tqdm

    from tandem.bench.stats import format_summary, summarize

    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts or 1)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = await _pick_model(client, args.base_url, args.model)
        counter = await _token_counter(client, args, model)
        print(f"prompt lengths counted by: {_COUNTER_WORDS[counter.method]}", file=sys.stderr)
        samples = _samples(args, counter)
        url = args.base_url + ("/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions")
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        rng = random.Random(args.seed + 1)
        bar = tqdm(total=len(samples), desc="bench serve", unit="req", disable=args.disable_tqdm)

        async def one(sample: SampleRequest) -> RequestResult:
            if gate is None:
                result = await send_request(client, url, _payload(args, model, sample), args.endpoint, sample)
            else:
                async with gate:
                    result = await send_request(
                        client, url, _payload(args, model, sample), args.endpoint, sample
                    )
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for sample in samples:
            tasks.append(asyncio.create_task(one(sample)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    summary = summarize(results, duration)
    print(format_summary(summary))
    return _result_dict(args, model, counter.method, summary, results)


_COUNTER_WORDS = {
    "tokenizer": "the local tokenizer (--tokenizer): exact",
    "server": "the server's /tokenize: exact",
    "words": "approximation, one token per word (no --tokenizer and no /tokenize on the server)",
}


def _result_dict(
    args: argparse.Namespace, model: str, method: str, summary: dict, results: list[RequestResult]
) -> dict[str, Any]:
    ms = 1000.0
    return {
        "base_url": args.base_url,
        "model": model,
        "endpoint": args.endpoint,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "token_count_method": method,
        "summary": summary,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts_ms": [None if r.ttft is None else r.ttft * ms for r in results],
        "tpots_ms": [None if r.tpot is None else r.tpot * ms for r in results],
        "itls_ms": [gap * ms for r in results for gap in r.itl],
        "e2els_ms": [r.latency * ms if r.success else None for r in results],
        "errors": [r.error for r in results],
    }


def run_serve_bench(args: argparse.Namespace) -> int:
    from tandem.bench.plot import check_plotting, plot_latencies

    if args.plot and (problem := check_plotting()):
        print(f"tandem bench serve: {problem}", file=sys.stderr)
        return 2
    if args.dataset == "jsonl" and not args.dataset_path:
        print("tandem bench serve: --dataset jsonl needs --dataset-path FILE", file=sys.stderr)
        return 2
    if args.num_prompts < 1 or args.random_input_len < 1 or args.random_output_len < 1:
        print("tandem bench serve: --num-prompts and the lengths must be at least 1", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_benchmark(args))
    except (OSError, ValueError) as exc:
        print(f"tandem bench serve: {exc}", file=sys.stderr)
        return 1
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results written to {args.result_json}", file=sys.stderr)
    if args.plot:
        plot_latencies(result, args.plot)
        print(f"latency plot written to {args.plot}", file=sys.stderr)
    return 0 if result["summary"]["failed"] == 0 else 1
