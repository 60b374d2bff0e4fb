"""frontend_overhead.py's requests/s run for several source trees side by side: one stub engine and one API
process per tree, all started at once, then rounds that alternate between the trees (the order reversed
every other round), so load from other processes falls on every version alike. Prints each round and the
medians: requests/s and the CPU time per request of each API process and stub engine.

    git worktree add /tmp/before main        # or any checkout, with .venv reachable as <tree>/.venv
    .venv/bin/python benchmarks/frontend_ab.py /tmp/before . --rounds 12 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare_peers import stop_all, wait_healthy  # noqa: E402
from benchmarks.frontend_overhead import Served, free_port, measure_throughput  # noqa: E402


def start(tree: Path, address: str, port: int) -> list[subprocess.Popen]:
    python = str(tree / ".venv" / "bin" / "python")
    engine = [python, str(tree / "benchmarks" / "frontend_overhead.py"), "--run-stub-engine", address]
    api = [python, "-m", "tandem", "api", "--engine", address, "--port", str(port)]
    api += ["--disable-log-requests", "--log-level", "warning"]
    return [
        subprocess.Popen(
            engine + ["--step-ms", "0"], cwd=tree, start_new_session=True, stderr=subprocess.DEVNULL
        ),
        subprocess.Popen(api, cwd=tree, start_new_session=True, stderr=subprocess.DEVNULL),
    ]


def one_round(served: Served, args: argparse.Namespace) -> tuple[float, float, float]:
    """(requests/s, API ms per request, engine ms per request), read off measure_throughput's lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        asyncio.run(measure_throughput(served, args))
    text = out.getvalue()
    rps = float(text.split(" requests/s")[0].rsplit(" ", 1)[1])
    api = float(text.split("API process ")[1].split(" ms")[0])
    engine = float(text.split("stub engine ")[1].split(" ms")[0])
    return rps, api, engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trees", nargs="+", type=Path, help="source trees (each with .venv)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    args.client = "raw"
    trees = [t.resolve() for t in args.trees]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="tandem-ab-") as folder:
        try:
            served = []
            for i, tree in enumerate(trees):
                port = free_port()
                pair = start(tree, f"ipc://{folder}/engine-{i}.sock", port)
                procs += pair
                wait_healthy(port, pair[1], timeout_s=300)
                served.append(Served(port, pair[1].pid, pair[0].pid))
            print(os.popen("uptime").read().strip())
            results: list[list[tuple[float, float, float]]] = [[] for _ in trees]
            for r in range(args.rounds):
                order = range(len(trees)) if r % 2 == 0 else reversed(range(len(trees)))
                for i in order:
                    rps, api, engine = one_round(served[i], args)
                    results[i].append((rps, api, engine))
                    print(
                        f"round {r} {trees[i]}: {rps:.0f} req/s, API {api:.3f} ms/req, engine {engine:.3f} ms/req"
                    )
            print(os.popen("uptime").read().strip())
            for tree, rows in zip(trees, results, strict=True):
                print(
                    f"{tree}: median {statistics.median(r[0] for r in rows):.0f} req/s, API "
                    f"{statistics.median(r[1] for r in rows):.3f} ms/req (min {min(r[1] for r in rows):.3f}), "
                    f"engine {statistics.median(r[2] for r in rows):.3f} ms/req"
                )
        finally:
            stop_all(procs)


if __name__ == "__main__":
    main()
