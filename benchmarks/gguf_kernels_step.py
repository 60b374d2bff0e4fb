"""One CPU decode step of the default model with and without the GGUF block kernels
(engine/layers/gguf_packed.py), same process, alternating rounds, per batch size and dtype.

    .venv/bin/python benchmarks/gguf_kernels_step.py                      # float16 and float32; batch 1 4 16 64
    .venv/bin/python benchmarks/gguf_kernels_step.py --dtype float16 --batch 1 8 --rounds 5
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
    p.add_argument("--dtype", nargs="+", default=["float16", "float32"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=8, help="steps per measurement (median taken)")
    args = p.parse_args()
    for dtype in args.dtype:
        for batch in args.batch:
            dense = tandem_step(dtype, batch, args.context, gguf_cpu_kernels=False)[0]
            blocks = tandem_step(dtype, batch, args.context, gguf_cpu_kernels=True)[0]
            ratios = []
            print(
                f"{dtype}, batch {batch}, context {args.context}: ms per decode step (median of {args.iters})"
            )
            for r in range(args.rounds):
                d, b = time_steps(dense, args.iters), time_steps(blocks, args.iters)
                ratios.append(d / b)
                print(
                    f"  round {r + 1}: dense {d:7.1f}  blocks {b:7.1f}  dense/blocks {d / b:5.2f}", flush=True
                )
            ratios.sort()
            print(f"  median dense/blocks {ratios[len(ratios) // 2]:.2f}")
            del dense, blocks


if __name__ == "__main__":
    main()
