"""Overload: many more requests at once than admission allows, watching the API process's memory.

Starts `tandem serve` with a small --max-num-seqs and --max-waiting-requests (the engine's admission
bound), fires --requests chat requests with a long prompt all at once, samples the RSS of the API and
engine processes every --sample-s, and reports the status codes, how fast the refusals came (503 with
Retry-After, docs/reliability.md "Overload"), peak RSS during the burst and RSS after the drain. Fails
(exit 1) on a 5xx other than 503, a 503 without Retry-After, an accepted request that did not complete,
or a server that does not drain (/load and KV free blocks back to their start).

    .venv/bin/python benchmarks/soak_overload.py --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare_peers import stop  # noqa: E402
from benchmarks.soak import Run, children, drained, load_state, sampler, start_server, wait_drained  # noqa: E402
from benchmarks.soak_traffic import words  # noqa: E402


async def one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[int, float, bool]:
    """(status, seconds to the answer, whether a 503 carried Retry-After)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    t0 = time.monotonic()
    try:
        resp = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError:
        return -1, time.monotonic() - t0, False
    elapsed = time.monotonic() - t0
    if resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] < 1:
        return -2, elapsed, False
    return resp.status_code, elapsed, "retry-after" in resp.headers


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values or [0.0])[0]


async def overload(args: argparse.Namespace, server_url: str, procs: dict) -> bool:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.requests, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=server_url, timeout=args.request_timeout_s, limits=limits
    ) as client:
        start = await load_state(client)
        free_at_start = [e["num_free_blocks"] for e in start["engines"]]
        run = Run()
        t0 = time.monotonic()
        sampling = asyncio.create_task(sampler(procs, run, args.sample_s, t0))
        await asyncio.sleep(args.sample_s * 2)  # a baseline before the burst
        prompts = [words(rng, args.prompt_words) for _ in range(args.requests)]
        t_burst = time.monotonic()
        results = await asyncio.gather(*(one(client, p, args.max_tokens) for p in prompts))
        burst_s = time.monotonic() - t_burst
        load = await wait_drained(client, free_at_start, args.drain_timeout_s)
        await asyncio.sleep(args.settle_s)
        sampling.cancel()
    codes = Counter(status for status, _, _ in results)
    refused = [t for status, t, _ in results if status == 503]
    served = [t for status, t, _ in results if status == 200]
    no_retry_after = sum(1 for status, _, has in results if status == 503 and not has)
    print(
        f"\n== overload: {args.requests} requests at once, {args.prompt_words}-word prompts, burst {burst_s:.1f} s =="
    )
    print(f"status codes: {dict(sorted(codes.items()))}; 503 without Retry-After: {no_retry_after}")
    for name, times in (("503", refused), ("200", served)):
        if times:
            print(
                f"time to {name}: median {statistics.median(times):.2f} s, p99 {pct(times, 99):.2f} s, max {max(times):.2f} s"
            )
    print("RSS (MiB): process, before the burst, peak, after the drain")
    for name, series in run.rss.items():
        base = series[1][1] if len(series) > 1 else series[0][1]
        print(
            f"  {name:14} {base / 2**20:8.1f} {max(b for _, b in series) / 2**20:8.1f} {series[-1][1] / 2**20:8.1f}"
        )
    print(f"after drain: /load {load}")
    bad = sum(n for status, n in codes.items() if status not in (200, 503))
    ok = bad == 0 and no_retry_after == 0 and drained(load, free_at_start)
    print(f"VERDICT: {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--prompt-words", type=int, default=1200, help="about 1.2 tokens per word")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-waiting-requests", type=int, default=32)
    p.add_argument("--sample-s", type=float, default=0.5)
    p.add_argument("--settle-s", type=float, default=10.0)
    p.add_argument("--drain-timeout-s", type=float, default=300.0)
    p.add_argument("--request-timeout-s", type=float, default=1200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through `finally`: stop the server
    flags = [
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-waiting-requests",
        str(args.max_waiting_requests),
    ]
    server = start_server("overload", flags, args.log_dir)
    try:
        return 0 if asyncio.run(overload(args, server.url, children(server))) else 1
    finally:
        stop(server.proc)


if __name__ == "__main__":
    sys.exit(main())
