"""Soak: mixed traffic against a real `tandem serve` for a set time, watching for leaks.

Starts `tandem serve` (and, unless --no-embeddings, a second `tandem serve --task embed`), sends the mix of
benchmarks/soak_traffic.py from --concurrency workers for --duration-s, samples the RSS of every API and
engine process (the launcher's children, found with psutil) every --sample-s, then stops the traffic and
checks that the servers drain: `/load` back to server_load 0 and outstanding 0, no request running or
waiting, every KV block free again (the number free before the first request). RSS growth is judged on
the samples after --warmup-s: the median of the last third may exceed the median of the first third by
at most --max-rss-growth-pct (see docs/reliability.md for why that bound). Prints a table and a verdict
and exits 1 on any failure (an unexpected answer, a 5xx, a server that died, a failed drain, growth).

    .venv/bin/python benchmarks/soak.py --duration-s 1200          # what `make stress` runs
    .venv/bin/python benchmarks/soak.py --duration-s 120 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare_peers import free_port, stop, wait_healthy  # noqa: E402
from benchmarks.soak_traffic import MIX, Outcome, Scenario, embeddings_scenario  # noqa: E402


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str


@dataclass
class Run:
    outcomes: Counter[tuple[str, int, bool]] = field(default_factory=Counter)
    failures: list[Outcome] = field(default_factory=list)
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # process -> (t, bytes)


def start_server(name: str, extra: list[str], log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "tandem", "serve", "--port", str(port), "--disable-log-requests", *extra]
    log = (log_dir / f"soak-{name}-{port}.log").open("w")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(port, proc)
    return Server(name, proc, f"http://127.0.0.1:{port}")


def children(server: Server) -> dict[str, psutil.Process]:
    """The launcher's API and engine processes, named e.g. `chat/api` and `chat/engine`."""
    found = {}
    for child in psutil.Process(server.proc.pid).children():
        argv = child.cmdline()
        role = argv[argv.index("tandem") + 1] if "tandem" in argv else child.name()
        found[f"{server.name}/{role}"] = child
    return found


def rss_bytes(proc: psutil.Process) -> int:
    total = proc.memory_info().rss
    return total + sum(c.memory_info().rss for c in proc.children(recursive=True))


async def sampler(procs: dict[str, psutil.Process], run: Run, period_s: float, t0: float) -> None:
    while True:
        now = time.monotonic() - t0
        for name, proc in procs.items():
            run.rss.setdefault(name, []).append((now, rss_bytes(proc)))
        await asyncio.sleep(period_s)


async def worker(
    client: httpx.AsyncClient, mix: list[tuple[Scenario, int]], rng: random.Random, stop_at: float, run: Run
) -> None:
    scenarios, weights = zip(*mix, strict=True)
    while time.monotonic() < stop_at:
        scenario = rng.choices(scenarios, weights)[0]
        try:
            outcome = await scenario(client, rng)
        except httpx.HTTPError as exc:  # a transport failure is never expected here
            outcome = Outcome(scenario.__name__, -1, False, f"{type(exc).__name__}: {exc}")
        run.outcomes[(outcome.kind, outcome.status, outcome.ok)] += 1
        if not outcome.ok:
            run.failures.append(outcome)


async def load_state(client: httpx.AsyncClient) -> dict:
    return (await client.get("/load")).json()


async def baseline_load(client: httpx.AsyncClient, timeout_s: float = 60.0) -> dict:
    """/load once every engine has reported its stats (right after start-up they are still null)."""
    deadline = time.monotonic() + timeout_s
    load = await load_state(client)
    while any(e["num_free_blocks"] is None for e in load["engines"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        load = await load_state(client)
    return load


def drained(load: dict, free_at_start: list[int | None]) -> bool:
    engines = load["engines"]
    return load["server_load"] == 0 and all(
        e["outstanding"] == 0
        and e["num_running"] == 0
        and e["num_waiting"] == 0
        and e["num_free_blocks"] == free
        for e, free in zip(engines, free_at_start, strict=True)
    )


async def wait_drained(client: httpx.AsyncClient, free_at_start: list[int | None], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        load = await load_state(client)
        if drained(load, free_at_start) or time.monotonic() > deadline:
            return load
        await asyncio.sleep(1.0)


def kv_usage_metric(url: str) -> list[str]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return [line for line in text.splitlines() if line.startswith("vllm:kv_cache_usage_perc")]


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    return statistics.linear_regression([t for t, _ in points], [m for _, m in points]).slope


def rss_summary(series: list[tuple[float, int]], warmup_s: float) -> dict[str, float]:
    mib = [(t, b / 2**20) for t, b in series]
    judged = [(t, m) for t, m in mib if t >= warmup_s] or mib
    third = max(1, len(judged) // 3)
    first, last = (
        statistics.median(m for _, m in judged[:third]),
        statistics.median(m for _, m in judged[-third:]),
    )
    slope = _slope(judged)
    return {
        "start": mib[0][1],
        "peak": max(m for _, m in mib),
        "end": mib[-1][1],
        "first_third": first,
        "last_third": last,
        "growth_pct": 100 * (last - first) / first,
        "slope_mib_per_min": slope * 60,
        "last_third_slope_mib_per_min": _slope(judged[-third:]) * 60,  # ~0 once the process has plateaued
        "samples": len(mib),
    }


def report(
    run: Run, args: argparse.Namespace, load: dict, ok_drain: bool, kv: list[str], wall_s: float
) -> bool:
    print(f"\n== soak: {wall_s:.0f} s of traffic, {args.concurrency} workers ==")
    print(f"{'kind':26} {'status':>6} {'ok':>4} {'count':>7}")
    for (kind, status, ok), count in sorted(run.outcomes.items()):
        print(f"{kind:26} {status:>6} {'yes' if ok else 'NO':>4} {count:>7}")
    total = sum(run.outcomes.values())
    print(f"total requests: {total}; unexpected answers: {len(run.failures)}")
    for failure in run.failures[:10]:
        print(f"  {failure.kind} {failure.status}: {failure.detail}")
    print(f"\nRSS (MiB), judged after {args.warmup_s:.0f} s of warm-up, every {args.sample_s:.0f} s:")
    print(
        f"{'process':18} {'start':>7} {'1st/3':>7} {'last/3':>7} {'growth':>7} {'MiB/min':>8} {'last/3':>8} "
        f"{'peak':>7} {'end':>7}"
    )
    grew = []
    for name, series in run.rss.items():
        s = rss_summary(series, args.warmup_s)
        print(
            f"{name:18} {s['start']:7.1f} {s['first_third']:7.1f} {s['last_third']:7.1f} {s['growth_pct']:6.1f}% "
            f"{s['slope_mib_per_min']:8.2f} {s['last_third_slope_mib_per_min']:8.2f} {s['peak']:7.1f} {s['end']:7.1f}"
        )
        if s["growth_pct"] > args.max_rss_growth_pct:
            grew.append(name)
    if args.rss_json is not None:
        args.rss_json.write_text(json.dumps(run.rss))
        print(f"RSS series written to {args.rss_json}")
    print(f"\nafter drain: /load {load}")
    print(f"metrics: {kv}")
    verdict = not run.failures and ok_drain and not grew
    reasons = [f"{len(run.failures)} unexpected answers"] if run.failures else []
    reasons += [] if ok_drain else ["did not drain (load/KV blocks not back to start)"]
    reasons += [f"RSS grew more than {args.max_rss_growth_pct}%: {', '.join(grew)}"] if grew else []
    print(f"\nVERDICT: {'PASS' if verdict else 'FAIL: ' + '; '.join(reasons)}")
    return verdict


async def soak(args: argparse.Namespace, servers: list[Server]) -> bool:
    chat_server = servers[0]
    procs = {name: p for s in servers for name, p in children(s).items()}
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    timeout = httpx.Timeout(args.request_timeout_s)
    async with httpx.AsyncClient(base_url=chat_server.url, timeout=timeout, limits=limits) as client:
        mix = list(MIX)
        embed_client = None
        if len(servers) > 1:
            embed_client = httpx.AsyncClient(base_url=servers[1].url, timeout=timeout, limits=limits)
            mix.append((embeddings_scenario(embed_client), 2))
        start_load = await baseline_load(client)
        free_at_start = [e["num_free_blocks"] for e in start_load["engines"]]
        print(f"before traffic: /load {start_load}", flush=True)
        run = Run()
        t0 = time.monotonic()
        sampling = asyncio.create_task(sampler(procs, run, args.sample_s, t0))
        stop_at = t0 + args.duration_s
        rng = random.Random(args.seed)
        workers = [
            worker(client, mix, random.Random(rng.random()), stop_at, run) for _ in range(args.concurrency)
        ]
        await asyncio.gather(*workers)
        wall_s = time.monotonic() - t0
        load = await wait_drained(client, free_at_start, args.drain_timeout_s)
        await asyncio.sleep(args.sample_s)  # one more sample after the drain
        sampling.cancel()
        if embed_client is not None:
            await embed_client.aclose()
    alive = all(s.proc.poll() is None for s in servers)
    ok = report(
        run, args, load, drained(load, free_at_start) and alive, kv_usage_metric(chat_server.url), wall_s
    )
    return ok and alive


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=1200.0, help="seconds of traffic (default 20 min)")
    p.add_argument("--concurrency", type=int, default=8, help="workers sending requests at once")
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--warmup-s", type=float, default=120.0, help="RSS samples before this are not judged")
    p.add_argument("--max-rss-growth-pct", type=float, default=10.0, help="last third vs first third median")
    p.add_argument("--drain-timeout-s", type=float, default=120.0)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-embeddings", action="store_true", help="skip the `--task embed` server")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    p.add_argument("--rss-json", type=Path, default=None, help="write every RSS sample: name -> [[t, bytes]]")
    p.add_argument("--server-arg", action="append", default=[], help="extra `tandem serve` flag (repeat)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    # A SIGTERM (a timeout, a CI cancel) unwinds through `finally`, so the servers are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers: list[Server] = []
    try:
        servers.append(start_server("chat", args.server_arg, args.log_dir))
        if not args.no_embeddings:
            servers.append(start_server("embed", ["--task", "embed"], args.log_dir))
        return 0 if asyncio.run(soak(args, servers)) else 1
    finally:
        for server in servers:
            stop(server.proc)


if __name__ == "__main__":
    sys.exit(main())
