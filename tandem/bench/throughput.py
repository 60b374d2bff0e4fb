"""`tandem bench throughput`: offline generation throughput through the `LLM` API (no HTTP)."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.offline import LLM


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64, help="Prompts in the batch.")
    p.add_argument("--input-len", type=int, default=128, help="Prompt tokens (random prompts).")
    p.add_argument("--output-len", type=int, default=64, help="Output tokens per prompt (EOS ignored).")
    p.add_argument("--dataset-path", default=None, help="JSONL prompt file instead of random prompts.")
    p.add_argument("--result-json", default=None, help="Write the numbers here.")
    p.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")


def random_prompt_ids(tokenizer, rng: random.Random, num_prompts: int, input_len: int) -> list[list[int]]:  # noqa: ANN001
    """Prompts of exactly `input_len` token ids, made of random common words."""
    from tandem.bench.datasets import WORDS

    prompts = []
    for _ in range(num_prompts):
        text = "".join(" " + rng.choice(WORDS) for _ in range(input_len))
        prompts.append(tokenizer.encode(text, add_special_tokens=False).ids[:input_len])
    return prompts


def run_throughput_bench(
    parser: argparse.ArgumentParser, ns: argparse.Namespace, llm: LLM | None = None
) -> int:
    """Runs the benchmark; `llm` reuses an already loaded model (its engine flags then do not apply)."""
    from tandem import LLM, SamplingParams  # noqa: F811
    from tandem.bench.engine_options import llm_options

    if min(ns.num_prompts, ns.input_len, ns.output_len) < 1:
        print("tandem bench throughput: counts and lengths must be at least 1", file=sys.stderr)
        return 2
    llm = llm or LLM(ns.model, **llm_options(parser, ns))
    params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    prompts: list = []
    if ns.dataset_path:
        from tandem.bench.datasets import jsonl_requests, word_counter

        samples = jsonl_requests(ns.dataset_path, word_counter(), ns.num_prompts, ns.output_len)
        prompts = [s.prompt for s in samples]
    else:
        prompts = random_prompt_ids(llm.get_tokenizer(), random.Random(ns.seed), ns.num_prompts, ns.input_len)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not ns.disable_tqdm)
    elapsed = time.perf_counter() - start
    num_in = sum(len(o.prompt_token_ids) for o in outputs)
    num_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    result = {
        "model": llm.model_name,
        "num_prompts": len(outputs),
        "elapsed_s": elapsed,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "requests_per_s": len(outputs) / elapsed,
        "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_in + num_out) / elapsed,
    }
    print(
        f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['output_tokens_per_s']:.1f} output tokens/s, "
        f"{result['total_tokens_per_s']:.1f} total tokens/s ({len(outputs)} prompts, {num_in} input and "
        f"{num_out} output tokens in {elapsed:.1f} s)"
    )
    if ns.result_json:
        with open(ns.result_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
