"""Offline output tokens/s of the default model at 1, 8, 32 and 64 concurrent sequences, through `LLM`.

Each level loads the model with `max_num_seqs` = that concurrency and generates a fixed-length batch
(EOS ignored, temperature 0). Ratios are against the concurrency-1 run of the same invocation: on a
shared 2-core machine, absolute numbers from another run are not comparable.

    .venv/bin/python benchmarks/offline_throughput.py                 # about 2-3 minutes on 2 idle cores
    .venv/bin/python benchmarks/offline_throughput.py --concurrency 1 4 --output-len 8   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

from tandem import LLM, SamplingParams
from tandem.bench.throughput import random_prompt_ids


def measure(args: argparse.Namespace, concurrency: int) -> dict:
    llm = LLM(
        args.model,
        max_num_seqs=concurrency,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=False,  # random prompts share nothing anyway; keep the work identical per level
    )
    tokenizer = llm.get_tokenizer()
    rng = random.Random(concurrency)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(
        random_prompt_ids(tokenizer, rng, 1, args.input_len), SamplingParams(max_tokens=2), use_tqdm=False
    )
    num_prompts = max(concurrency * args.waves, args.min_prompts)
    prompts = random_prompt_ids(tokenizer, rng, num_prompts, args.input_len)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "concurrency": concurrency,
        "num_prompts": num_prompts,
        "output_tokens": num_tokens,
        "elapsed_s": elapsed,
        "output_tokens_per_s": num_tokens / elapsed,
        "max_step_num_seqs": llm.stepper.stats().max_step_num_seqs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="Model path; default SmolLM2-135M-Instruct.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--waves", type=int, default=2, help="Prompts per level = waves x concurrency.")
    parser.add_argument("--min-prompts", type=int, default=4, help="At least this many prompts per level.")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-memory", default="1G")
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args()

    rows = []
    for concurrency in args.concurrency:
        rows.append(measure(args, concurrency))
        gc.collect()  # free the previous level's model and KV cache before loading the next
        print(f"concurrency {concurrency}: {rows[-1]['output_tokens_per_s']:.1f} output tok/s", flush=True)
    base = next((r for r in rows if r["concurrency"] == 1), rows[0])
    print(
        f"\n{'concurrency':>11} {'prompts':>8} {'out tokens':>10} {'seconds':>8} {'tok/s':>8} {'x base':>7} {'max batch':>9}"
    )
    for r in rows:
        r["ratio_vs_base"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        print(
            f"{r['concurrency']:>11} {r['num_prompts']:>8} {r['output_tokens']:>10} {r['elapsed_s']:>8.1f} "
            f"{r['output_tokens_per_s']:>8.1f} {r['ratio_vs_base']:>7.2f} {r['max_step_num_seqs']:>9}"
        )
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"base_concurrency": base["concurrency"], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
