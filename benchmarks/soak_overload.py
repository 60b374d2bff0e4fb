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
import json
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
from benchmarks.soak import Run, baseline_load, children, drained, sampler, start_server, wait_drained  # noqa: E402
from benchmarks.soak_traffic import words  # noqa: E402

Result = tuple[int, float, bool]


async def one(url: httpx.URL, prompt: str, max_tokens: int, timeout_s: float) -> Result:
    """(status, seconds to the answer, whether a 503 carried Retry-After). Plain HTTP/1.1 on its own
    connection: httpx's pool spends more time than the server does at 2,000 connections (py-spy showed
    the API process idle while the httpx client was still sending)."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(head + body)
        raw = await asyncio.wait_for(reader.read(), timeout_s)  # the server closes after the answer
        writer.close()
    except (OSError, TimeoutError):
        return -1, time.monotonic() - t0, False
    elapsed = time.monotonic() - t0
    header_text, _, payload = raw.partition(b"\r\n\r\n")
    lines = header_text.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else -1
    has_retry_after = any(line.lower().startswith("retry-after:") for line in lines[1:])
    if status == 200 and b'"completion_tokens"' not in payload:
        return -2, elapsed, False
    return status, elapsed, has_retry_after


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values or [0.0])[0]


async def burst(client: httpx.AsyncClient, args: argparse.Namespace, rng: random.Random) -> list[Result]:
    prompts = [words(rng, args.prompt_words) for _ in range(args.requests)]
    return await asyncio.gather(
        *(one(client.base_url, p, args.max_tokens, args.request_timeout_s) for p in prompts)
    )


def summarize(results: list[Result], burst_s: float, run: Run) -> bool:
    codes = Counter(status for status, _, _ in results)
    refused = [t for status, t, _ in results if status == 503]
    served = [t for status, t, _ in results if status == 200]
    no_retry_after = sum(1 for status, _, has in results if status == 503 and not has)
    print(
        f"status codes: {dict(sorted(codes.items()))}; 503 without Retry-After: {no_retry_after}; {burst_s:.1f} s"
    )
    for name, times in (("503", refused), ("200", served)):
        if times:
            print(
                f"  time to {name}: median {statistics.median(times):.2f} s, p99 {pct(times, 99):.2f} s, "
                f"min {min(times):.2f} s, max {max(times):.2f} s"
            )
    for name, series in run.rss.items():
        print(
            f"  RSS {name}: peak so far {max(b for _, b in series) / 2**20:.1f} MiB, now {series[-1][1] / 2**20:.1f}"
        )
    return all(status in (200, 503) for status in codes) and no_retry_after == 0


async def overload(args: argparse.Namespace, server_url: str, procs: dict) -> bool:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.requests, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=server_url, timeout=args.request_timeout_s, limits=limits
    ) as client:
        start = await baseline_load(client)
        free_at_start = [e["num_free_blocks"] for e in start["engines"]]
        run = Run()
        sampling = asyncio.create_task(sampler(procs, run, args.sample_s, time.monotonic()))
        await asyncio.sleep(args.sample_s * 2)  # a baseline before the burst
        print(
            f"\n== overload: {args.bursts} x {args.requests} requests at once, {args.prompt_words}-word prompts =="
        )
        for name, series in run.rss.items():
            print(f"  RSS {name} before: {series[-1][1] / 2**20:.1f} MiB")
        ok = True
        for i in range(args.bursts):
            # A second burst shows whether memory kept after the first is reused (bounded) or added to.
            t_burst = time.monotonic()
            results = await burst(client, args, rng)
            burst_s = time.monotonic() - t_burst
            load = await wait_drained(client, free_at_start, args.drain_timeout_s)
            await asyncio.sleep(args.settle_s)
            print(f"burst {i + 1}:", end=" ")
            ok = summarize(results, burst_s, run) and drained(load, free_at_start) and ok
        sampling.cancel()
    print(f"after drain: /load {load}")
    print(f"VERDICT: {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--bursts", type=int, default=2)
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
