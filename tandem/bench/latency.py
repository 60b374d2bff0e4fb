"""`tandem bench latency`: single-request latency (time to first token, per output token) through `LLM`."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import TYPE_CHECKING

from tandem.bench.stats import distribution

if TYPE_CHECKING:
    from tandem.offline import LLM


def add_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=32, help="Prompt tokens.")
    p.add_argument("--output-len", type=int, default=32, help="Output tokens (EOS ignored).")
    p.add_argument("--batch-size", type=int, default=1, help="Prompts per iteration, run together.")
    p.add_argument("--num-iters-warmup", type=int, default=2, help="Untimed iterations first.")
    p.add_argument("--num-iters", type=int, default=5, help="Timed iterations.")
    p.add_argument("--result-json", default=None, help="Write the numbers here.")


def run_latency_bench(parser: argparse.ArgumentParser, ns: argparse.Namespace, llm: LLM | None = None) -> int:
    """Runs the benchmark; `llm` reuses an already loaded model (its engine flags then do not apply)."""
    from tandem import LLM, SamplingParams  # noqa: F811
    from tandem.bench.engine_options import llm_options
    from tandem.bench.throughput import random_prompt_ids

    if min(ns.input_len, ns.output_len, ns.batch_size, ns.num_iters) < 1 or ns.num_iters_warmup < 0:
        print(
            "tandem bench latency: lengths, --batch-size and --num-iters must be at least 1", file=sys.stderr
        )
        return 2
    # Prefix caching would turn every prompt after the first into a cache hit; measure the real work.
    llm = llm or LLM(ns.model, **{"enable_prefix_caching": False, **llm_options(parser, ns)})
    tokenizer = llm.get_tokenizer()
    rng = random.Random(ns.seed)
    full = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def timed(params: SamplingParams) -> float:
        prompts = random_prompt_ids(tokenizer, rng, ns.batch_size, ns.input_len)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    for _ in range(ns.num_iters_warmup):
        timed(full)
    ttfts = [timed(first) for _ in range(ns.num_iters)]
    latencies = [timed(full) for _ in range(ns.num_iters)]
    mean_ttft = sum(ttfts) / len(ttfts)
    per_token = [(lat - mean_ttft) / max(ns.output_len - 1, 1) for lat in latencies]
    result = {
        "model": llm.model_name,
        "batch_size": ns.batch_size,
        "input_len": ns.input_len,
        "output_len": ns.output_len,
        "ttft_ms": distribution(ttfts),
        "latency_ms": distribution(latencies),
        "per_output_token_ms": distribution(per_token),
        "latencies_s": latencies,
    }
    for key, label in (
        ("ttft_ms", "time to first token"),
        ("latency_ms", "request latency"),
        ("per_output_token_ms", "per output token"),
    ):
        d = result[key]
        print(
            f"{label:<22} mean {d['mean']:9.2f} ms  median {d['median']:9.2f}  p90 {d['p90']:9.2f}  p99 {d['p99']:9.2f}"
        )
    if ns.result_json:
        with open(ns.result_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
