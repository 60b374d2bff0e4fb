"""Tandem against llama.cpp's `llama-server` on the same GGUF, same prompts, same machine, in one run.

Starts both servers (each on a free port), then for every stream count runs `tandem bench serve`'s load
test (streamed chat, `ignore_eos`, identical seeded prompts) against each, alternating the two servers
round by round so machine noise falls on both alike. Every round and stream count draws new prompts (the
same for both servers), so neither server has them cached: both cache prompt prefixes, and a repeated
prompt would time the caches, not prefill. Prints output tok/s, TTFT and ITL percentiles per
server and the Tandem / llama-server ratios, then (unless --skip-transformers) `transformers` `generate`
at batch 1 and 8 on the same weights, with both servers stopped. llama-server is a benchmark peer, never
a dependency: build it as docs/benchmarking.md says.

    .venv/bin/python benchmarks/compare_peers.py --llama-server /path/to/llama-server
    .venv/bin/python benchmarks/compare_peers.py --llama-server BIN --streams 1 16 --output-len 64 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.loader.model_loader import resolve_model_path  # noqa: E402
from tandem.bench.serve import add_serve_args, run_benchmark  # noqa: E402

SERVED_NAME = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_llama_server(binary: str, gguf: Path, port: int, threads: int, log: Path) -> subprocess.Popen:
    # 64 slots sharing a 32k-token context: continuous batching at up to 64 streams, as in the issue.
    argv = [binary, "-m", str(gguf), "-t", str(threads), "-np", "64", "-c", "32768"]
    argv += ["--port", str(port), "--alias", SERVED_NAME]
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def start_tandem(gguf: Path, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tandem", "serve", str(gguf), "--port", str(port), *extra]
    return subprocess.Popen(
        argv, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server on port {port} not healthy after {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    stop_all([proc])


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every process group still running, then up to 30 s each before SIGKILL."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in running:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench_args(port: int, streams: int, seed: int, args: argparse.Namespace) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(
        [
            "--base-url", f"http://127.0.0.1:{port}",
            "--endpoint", "chat",
            "--num-prompts", str(max(streams * args.waves, 2)),
            "--max-concurrency", str(streams),
            "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len),
            "--seed", str(seed),  # the same prompts for both servers, new ones each round
            "--disable-tqdm",
        ]
    )  # fmt: skip


def run_level(port: int, streams: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    summary = asyncio.run(run_benchmark(bench_args(port, streams, seed, args)))["summary"]
    if summary["failed"]:
        print(f"  {summary['failed']} requests failed: {summary['errors']}", file=sys.stderr)
    return summary


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def report(
    results: dict[tuple[str, int], list[dict[str, Any]]], streams: list[int], names: list[str]
) -> None:
    print("\n| streams | server | output tok/s (per round) | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|---|")
    for n in streams:
        for name in names:
            runs = results[(name, n)]
            tps = ", ".join(f"{r['output_throughput']:.1f}" for r in runs)
            ttft = min(runs, key=lambda r: r["ttft_ms"]["median"] or 1e18)["ttft_ms"]
            itl = min(runs, key=lambda r: r["itl_ms"]["median"] or 1e18)["itl_ms"]
            print(
                f"| {n} | {name} | {tps} | {_fmt(ttft['median'])} / {_fmt(ttft['p99'])} "
                f"| {_fmt(itl['median'])} / {_fmt(itl['p99'])} |"
            )
    if len(names) < 2:
        return
    print(
        "\n| streams | Tandem / llama-server tok/s, per round | median | TTFT p50 ratio (lower: Tandem faster) |"
    )
    print("|---|---|---|---|")
    for n in streams:
        ratios = [
            t["output_throughput"] / max(ll["output_throughput"], 1e-9)
            for t, ll in zip(results[("tandem", n)], results[("llama-server", n)], strict=True)
        ]
        ttft = [
            (t["ttft_ms"]["median"] or 0) / max(ll["ttft_ms"]["median"] or 1e-9, 1e-9)
            for t, ll in zip(results[("tandem", n)], results[("llama-server", n)], strict=True)
        ]
        print(
            f"| {n} | {', '.join(f'{r:.2f}' for r in ratios)} | {statistics.median(ratios):.2f} "
            f"| {statistics.median(ttft):.2f} |"
        )


def transformers_generate(gguf: Path, dtype: str, batches: list[int], output_len: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
    ).eval()
    print(f"\ntransformers generate ({dtype}, greedy, {output_len} new tokens, EOS ignored):")
    for batch in batches:
        ids = tok(["Write a long story about a cat."] * batch, return_tensors="pt").input_ids
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
            elapsed = time.perf_counter() - start
        new = (out.shape[1] - ids.shape[1]) * batch
        print(f"  batch {batch}: {new / elapsed:.1f} output tok/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-server", default=None, help="llama-server binary; without it, Tandem alone.")
    p.add_argument("--model", default=None, help="GGUF file (default: the default model's).")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per stream count")
    p.add_argument("--waves", type=int, default=1, help="requests per stream in each run")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument(
        "--repeat-prompts",
        action="store_true",
        help="every round sends the first round's prompts: from round 2 on, TTFT times prefix-cache hits",
    )
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server -t")
    p.add_argument("--tandem-arg", action="append", default=[], help="extra `tandem serve` argument")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--transformers-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--log-dir", default="/tmp", help="server logs go here")
    args = p.parse_args()
    gguf = resolve_model_path(args.model)
    logs = Path(args.log_dir)
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        port = free_port()
        servers["tandem"] = (start_tandem(gguf, port, args.tandem_arg, logs / "compare-tandem.log"), port)
        if args.llama_server:
            port = free_port()
            proc = start_llama_server(args.llama_server, gguf, port, args.threads, logs / "compare-llama.log")
            servers["llama-server"] = (proc, port)
        for proc, port in servers.values():
            wait_healthy(port, proc)
        names = list(servers)
        results: dict[tuple[str, int], list[dict[str, Any]]] = {
            (n, s): [] for n in names for s in args.streams
        }
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]  # who goes first alternates too
            for streams in args.streams:
                for name in order:
                    print(f"round {rnd + 1}, {streams} streams: {name}", file=sys.stderr, flush=True)
                    seed = streams if args.repeat_prompts else 1000 * rnd + streams
                    results[(name, streams)].append(run_level(servers[name][1], streams, seed, args))
        report(results, args.streams, names)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    if not args.skip_transformers:
        transformers_generate(gguf, args.transformers_dtype, [1, 8], args.output_len)


if __name__ == "__main__":
    main()
