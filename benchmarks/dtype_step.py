"""One CPU decode step of the default model in each dtype (and each float16 matmul path), same process,
alternating rounds: which is fastest at which batch size on this CPU (the other half of the `--dtype auto`
question; fidelity is benchmarks/int8_fidelity.py's).

A candidate is a dtype, or `float16/PATH` with PATH one of benchmarks/fp16_paths.py's (`float16` alone
is `float16/routed`, what the engine runs). The float16 candidates share one model.

    .venv/bin/python benchmarks/dtype_step.py          # bf16, fp16 routed, fp16 GEMV only, fp32; batch 1 4 16 64
    .venv/bin/python benchmarks/dtype_step.py --candidates bfloat16 float16 float16/bf16-wide --batch 1 4 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_CANDIDATES = ["bfloat16", "float16", "float16/gemv-only", "float32"]


def main() -> None:
    from engine.cpu_threads import configure_openmp

    configure_openmp()  # as the engine does, before torch loads
    from benchmarks.cpu_decode_step import tandem_step, time_steps
    from benchmarks.fp16_paths import fp16_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=6, help="steps per measurement (median taken)")
    args = p.parse_args()
    for batch in args.batch:
        steps = {}
        for name in args.candidates:
            dtype, _, path = name.partition("/")
            if dtype not in steps:
                with fp16_path("routed"):
                    steps[dtype] = tandem_step(dtype, batch, args.context)[0]
        print(f"batch {batch}, context {args.context}: ms per decode step (median of {args.iters})")
        for r in range(args.rounds):
            row = []
            for name in args.candidates:
                dtype, _, path = name.partition("/")
                with fp16_path(path or "routed"):
                    row.append(f"{name} {time_steps(steps[dtype], args.iters):7.1f}")
            print(f"  round {r + 1}: {'  '.join(row)}", flush=True)
        del steps


if __name__ == "__main__":
    main()
