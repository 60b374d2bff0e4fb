"""One CPU decode step of the default model in each dtype, same process, alternating rounds: which dtype
is fastest at which batch size on this CPU (the other half of the `--dtype auto` question; fidelity is
benchmarks/int8_fidelity.py's).

    .venv/bin/python benchmarks/dtype_step.py                          # bf16, fp16, fp32 at batch 1 and 16
    .venv/bin/python benchmarks/dtype_step.py --dtypes bfloat16 float16 --batch 1 4 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from engine.cpu_threads import configure_openmp

    configure_openmp()  # as the engine does, before torch loads
    from benchmarks.cpu_decode_step import tandem_step, time_steps

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=6, help="steps per measurement (median taken)")
    args = p.parse_args()
    for batch in args.batch:
        steps = {dtype: tandem_step(dtype, batch, args.context)[0] for dtype in args.dtypes}
        print(f"batch {batch}, context {args.context}: ms per decode step (median of {args.iters})")
        for r in range(args.rounds):
            row = "  ".join(f"{dtype} {time_steps(step, args.iters):8.1f}" for dtype, step in steps.items())
            print(f"  round {r + 1}: {row}", flush=True)
        del steps


if __name__ == "__main__":
    main()
