"""One CPU decode step under different OpenMP wait policies and thread counts: each setting in its own
process (GNU OpenMP reads its environment once, when torch loads it), settings alternated, rounds repeated.

Run it on a loaded machine too (another CPU-bound process on a core): that is where spinning threads lose.

    .venv/bin/python benchmarks/openmp_wait.py                       # passive / spin, 2 threads, batch 1
    .venv/bin/python benchmarks/openmp_wait.py --settings OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 \
        --threads 1 2 --batch 16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(dtype: str, batch: int, threads: list[int], iters: int) -> None:
    """In the measured process: ms per decode step for each thread count, one line."""
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.cpu_decode_step import tandem_step, time_steps

    step, _ = tandem_step(dtype, batch, 128)
    out = []
    for n in threads:
        torch.set_num_threads(n)
        out.append(f"{time_steps(step, iters):.1f}")
    print(" ".join(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=300000"])
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.dtype, args.batch, args.threads, args.iters)
        return
    base = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }
    results: dict[str, list[str]] = {s: [] for s in args.settings}
    for _ in range(args.rounds):
        for setting in args.settings:
            key, _, value = setting.partition("=")
            argv = [
                sys.executable,
                __file__,
                "--child",
                "--dtype",
                args.dtype,
                "--batch",
                str(args.batch),
                "--iters",
                str(args.iters),
            ]
            argv += ["--threads", *map(str, args.threads)]
            run = subprocess.run(argv, env={**base, key: value}, capture_output=True, text=True, check=True)
            results[setting].append(run.stdout.strip().splitlines()[-1])
    print(
        f"{args.dtype} decode step, batch {args.batch}, ms (median of {args.iters}) for threads {args.threads}, per round:"
    )
    for setting, rounds in results.items():
        print(f"  {setting:<28} " + " | ".join(rounds))


if __name__ == "__main__":
    main()
