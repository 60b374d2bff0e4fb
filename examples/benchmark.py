"""Benchmark a running server from Python: the same code as `tandem bench serve`, results as a dict.

    python examples/benchmark.py --base-url http://127.0.0.1:8000 --num-prompts 20

The command line does the same and more (datasets, --plot):
    tandem bench serve --base-url http://127.0.0.1:8000 --num-prompts 20 --result-json out.json
"""

import argparse
import asyncio

from tandem.bench.serve import run_benchmark
from tandem.cli import build_parser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=4)
    args = parser.parse_args()

    bench_args = build_parser().parse_args(
        ["bench", "serve", "--base-url", args.base_url, "--num-prompts", str(args.num_prompts),
         "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
         "--max-concurrency", "4", "--disable-tqdm"]
    )  # fmt: skip
    result = asyncio.run(run_benchmark(bench_args))
    summary = result["summary"]
    print(
        f"\n{summary['completed']} ok, {summary['failed']} failed; {summary['output_throughput']:.1f} output tok/s; "
        f"median TTFT {summary['ttft_ms']['median']:.0f} ms; median TPOT {summary['tpot_ms']['median'] or 0:.0f} ms"
    )
    if summary["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
