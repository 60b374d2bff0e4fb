"""What the serving path costs apart from the model: one API process in front of a real engine process
(real loop, scheduler, stepper, IO threads, ZeroMQ) whose model is replaced by a stub that "samples" the
next token instantly.

Two measurements, through real HTTP (uvicorn) with streamed chat completions, each with its own pair
of processes:
- requests/s: `--requests` streamed requests of `--tokens` tokens each, `--concurrency` at a time, the
  stub answering instantly;
- added latency per token: one stream of `--latency-tokens` tokens while the stub takes `--step-ms` per
  step like a real model; the stub notes (CLOCK_MONOTONIC, shared by all processes) when each token
  leaves the model, the client when its text arrives: the difference is what the engine loop, ZeroMQ,
  the API process and HTTP add to every token.

The load generator runs on the same machine (httpx, asyncio), so on a small machine it takes CPU from
the API process; the numbers are a lower bound of what the API process can serve.

    .venv/bin/python benchmarks/frontend_overhead.py
    .venv/bin/python benchmarks/frontend_overhead.py --requests 2000 --concurrency 128 --tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class InstantRunner:
    """Stands in for ModelRunner: every row that reaches the end of its tokens gets the next token of a
    fixed sentence at once (real words, so the API process detokenizes real text)."""

    def __init__(self, token_ids: list[int], step_s: float, log: list[float]) -> None:
        self.token_ids = token_ids
        self.step_s = step_s
        self.log = log  # time.monotonic() of each step that sampled, with --step-ms

    def execute(self, out: object, bitmask_for: object = None) -> object:
        from engine.step_output import ModelRunnerOutput

        if self.step_s:
            time.sleep(self.step_s)  # the model's time
        sampled = {}
        for request, num_new in out.scheduled:  # type: ignore[attr-defined]
            if request.num_computed_tokens + num_new == request.num_tokens:
                sampled[request.request_id] = self.token_ids[request.num_output_tokens % len(self.token_ids)]
        if self.step_s and sampled:
            self.log.append(time.monotonic())
        return ModelRunnerOutput(sampled)


def run_stub_engine(address: str, step_ms: float, log_path: str | None) -> None:
    """The engine process: the default model's tokenizer and scheduler, an instant model."""
    from tokenizers import Tokenizer

    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.engine_setup import build_engine_parts

    config = EngineConfig(listen=address, dtype="float32", kv_cache_memory=256 * 2**20)
    parts = build_engine_parts(config)
    tokenizer = Tokenizer.from_str(parts.ready.tokenizer_json)
    words = tokenizer.encode(" The quick brown fox jumps over the lazy dog, and then it runs away.").ids
    log: list[float] = []
    parts.runner = InstantRunner(words, step_ms / 1000, log)  # type: ignore[assignment]
    core = EngineCore(config, parts)
    core.install_signal_handlers()
    try:
        core.run()
    finally:
        if log_path:
            Path(log_path).write_text("\n".join(repr(t) for t in log))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _stream(client: object, url: str, body: dict) -> list[float]:
    """Arrival times (time.monotonic) of the SSE chunks that carry text, of one streamed request."""
    times = []
    async with client.stream("POST", url, json=body) as resp:  # type: ignore[attr-defined]
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                times.append(time.monotonic())
    return times


def _body(model: str, tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }


async def measure_throughput(port: int, args: argparse.Namespace) -> None:
    import httpx

    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/chat/completions"
    async with httpx.AsyncClient(
        timeout=120, limits=httpx.Limits(max_connections=args.concurrency)
    ) as client:
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        for _ in range(3):  # warm-up
            await _stream(client, url, _body(model, 4))
        gate = asyncio.Semaphore(args.concurrency)

        async def one() -> int:
            async with gate:
                return len(await _stream(client, url, _body(model, args.tokens)))

        start = time.perf_counter()
        chunks = await asyncio.gather(*(one() for _ in range(args.requests)))
        elapsed = time.perf_counter() - start
    print(
        f"{args.requests} streamed requests of {args.tokens} tokens, {args.concurrency} at a time, instant "
        f"model: {args.requests / elapsed:.0f} requests/s, {sum(chunks) / elapsed:.0f} text chunks/s"
    )


async def measure_latency(port: int, args: argparse.Namespace) -> tuple[float, list[float]]:
    """(when the timed stream started, arrival times of its text chunks)."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        for _ in range(2):  # warm-up
            await _stream(client, url, _body(model, 4))
        await asyncio.sleep(0.5)
        start = time.monotonic()
        return start, await _stream(client, url, _body(model, args.latency_tokens))


@contextlib.contextmanager
def serving(step_ms: float, log_path: str | None) -> Iterator[int]:
    """A stub engine process and one API process in front of it; yields the API port."""
    from benchmarks.compare_peers import wait_healthy

    folder = tempfile.TemporaryDirectory(prefix="tandem-overhead-")
    address = f"ipc://{folder.name}/engine.sock"
    port = free_port()
    engine_argv = [sys.executable, __file__, "--run-stub-engine", address, "--step-ms", str(step_ms)]
    engine_argv += ["--stub-log", log_path] if log_path else []
    api_argv = [sys.executable, "-m", "tandem", "api", "--engine", address, "--port", str(port)]
    api_argv += ["--disable-log-requests", "--log-level", "warning"]
    procs = [
        subprocess.Popen(engine_argv, start_new_session=True, stderr=subprocess.DEVNULL),
        subprocess.Popen(api_argv, cwd=ROOT, start_new_session=True),
    ]
    try:
        wait_healthy(port, procs[1], timeout_s=300)
        yield port
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        folder.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16, help="tokens per request in the requests/s run")
    p.add_argument("--latency-tokens", type=int, default=200)
    p.add_argument("--step-ms", type=float, default=20.0, help="the stub model's step in the latency run")
    p.add_argument("--run-stub-engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stub-log", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_stub_engine:
        run_stub_engine(args.run_stub_engine, args.step_ms, args.stub_log)
        return
    with serving(0.0, None) as port:
        asyncio.run(measure_throughput(port, args))
    with tempfile.TemporaryDirectory(prefix="tandem-overhead-") as logs:
        log_path = os.path.join(logs, "steps.txt")
        with serving(args.step_ms, log_path) as port:
            start, arrivals = asyncio.run(measure_latency(port, args))
        produced = [t for t in map(float, Path(log_path).read_text().split()) if t >= start]
    if len(produced) != len(arrivals):
        print(f"warning: {len(produced)} tokens produced, {len(arrivals)} text chunks received")
    added = sorted((a - t) * 1000 for t, a in zip(produced, arrivals, strict=False))
    print(
        f"one stream of {len(added)} tokens, stub model step {args.step_ms} ms: added latency per token "
        f"(model done -> text at the client) median {statistics.median(added):.3f} ms, "
        f"p90 {added[int(len(added) * 0.9)]:.3f} ms, max {added[-1]:.3f} ms"
    )


if __name__ == "__main__":
    main()
