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

The load generator runs on the same machine (by default a minimal asyncio HTTP client,
benchmarks/raw_sse_client.py), so on a small machine it takes CPU from the API process; the numbers are
a lower bound of what the API process can serve. The requests/s run therefore also prints the CPU time each process used per request (API process, stub engine, load
generator): the API process's share is what one API process costs, whoever else shares its cores.

    .venv/bin/python benchmarks/frontend_overhead.py
    .venv/bin/python benchmarks/frontend_overhead.py --requests 2000 --concurrency 128 --tokens 8
    .venv/bin/python benchmarks/frontend_overhead.py --client httpx   # the old, heavier load generator

benchmarks/frontend_ab.py runs the requests/s part for several source trees side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.raw_sse_client import RawSSEConnection  # noqa: E402


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


def _is_text_event(event: bytes) -> bool:
    """An SSE event that carries generated text (not the role chunk, usage or [DONE])."""
    return event.startswith(b"data: ") and b'"content":"' in event and b'"content":""' not in event


class Streamer:
    """Streamed chat requests over up to `connections` keep-alive connections, by the light raw client
    (default) or by httpx (heavier: on 2 cores it took more CPU per request than the API process)."""

    def __init__(self, kind: str, port: int, connections: int) -> None:
        self.kind, self.port = kind, port
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.idle: list[RawSSEConnection] = []
        self.gate = asyncio.Semaphore(connections)
        self.httpx: Any = None
        if kind == "httpx":
            import httpx

            limits = httpx.Limits(max_connections=connections)
            self.httpx = httpx.AsyncClient(timeout=120, limits=limits)

    async def model(self) -> str:
        import httpx

        async with httpx.AsyncClient() as client:
            reply = await client.get(f"http://127.0.0.1:{self.port}/v1/models")
        return str(reply.json()["data"][0]["id"])

    async def stream(self, body: dict) -> list[float]:
        """Arrival times (time.monotonic) of the SSE events that carry text, of one streamed request."""
        async with self.gate:
            if self.httpx is not None:
                return await self._stream_httpx(body)
            conn = self.idle.pop() if self.idle else await RawSSEConnection.open("127.0.0.1", self.port)
            times = await conn.stream_post("/v1/chat/completions", body, _is_text_event)
            self.idle.append(conn)
            return times

    async def _stream_httpx(self, body: dict) -> list[float]:
        times = []
        async with self.httpx.stream("POST", self.url, json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if _is_text_event(line.encode()):
                    times.append(time.monotonic())
        return times

    async def close(self) -> None:
        if self.httpx is not None:
            await self.httpx.aclose()
        for conn in self.idle:
            await conn.close()


def _body(model: str, tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Served:
    port: int
    api_pid: int
    engine_pid: int


async def measure_throughput(served: Served, args: argparse.Namespace) -> None:
    streamer = Streamer(args.client, served.port, args.concurrency)
    try:
        model = await streamer.model()
        for _ in range(3):  # warm-up
            await streamer.stream(_body(model, 4))
        pids = {
            "API process": served.api_pid,
            "stub engine": served.engine_pid,
            "load generator": os.getpid(),
        }
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.perf_counter()
        body = _body(model, args.tokens)
        chunks = await asyncio.gather(*(streamer.stream(body) for _ in range(args.requests)))
        elapsed = time.perf_counter() - start
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    finally:
        await streamer.close()
    print(
        f"{args.requests} streamed requests of {args.tokens} tokens, {args.concurrency} at a time, instant "
        f"model, {args.client} client: {args.requests / elapsed:.0f} requests/s, "
        f"{sum(map(len, chunks)) / elapsed:.0f} text chunks/s"
    )
    print(
        "CPU per request: "
        + ", ".join(f"{name} {cpu[name] / args.requests * 1000:.2f} ms" for name in pids)
        + f" (of {elapsed:.1f} s wall: "
        + ", ".join(f"{name} {cpu[name] / elapsed:.0%}" for name in pids)
        + " of one core)"
    )


async def measure_latency(served: Served, args: argparse.Namespace) -> tuple[float, list[float]]:
    """(when the timed stream started, arrival times of its text chunks)."""
    streamer = Streamer(args.client, served.port, 1)
    try:
        model = await streamer.model()
        for _ in range(2):  # warm-up
            await streamer.stream(_body(model, 4))
        await asyncio.sleep(0.5)
        start = time.monotonic()
        return start, await streamer.stream(_body(model, args.latency_tokens))
    finally:
        await streamer.close()


@contextlib.contextmanager
def serving(step_ms: float, log_path: str | None) -> Iterator[Served]:
    """A stub engine process and one API process in front of it."""
    from benchmarks.compare_peers import stop_all, wait_healthy

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
        yield Served(port, procs[1].pid, procs[0].pid)
    finally:
        stop_all(procs)
        folder.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16, help="tokens per request in the requests/s run")
    p.add_argument("--latency-tokens", type=int, default=200)
    p.add_argument("--step-ms", type=float, default=20.0, help="the stub model's step in the latency run")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw", help="load generator's HTTP client")
    p.add_argument("--run-stub-engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stub-log", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_stub_engine:
        run_stub_engine(args.run_stub_engine, args.step_ms, args.stub_log)
        return
    with serving(0.0, None) as served:
        asyncio.run(measure_throughput(served, args))
    with tempfile.TemporaryDirectory(prefix="tandem-overhead-") as logs:
        log_path = os.path.join(logs, "steps.txt")
        with serving(args.step_ms, log_path) as served:
            start, arrivals = asyncio.run(measure_latency(served, args))
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
