"""One CPU decode step of the default model with the GGUF block kernels (what `--dtype auto` runs:
engine/layers/gguf_packed.py) against the exact float32 block kernel (an explicit --dtype float32) and the
dense matmuls (--no-gguf-cpu-kernels) in float32 and float16, same process, alternating rounds, per batch
size. CPU decode graphs are on wherever they capture (the default).

    .venv/bin/python benchmarks/gguf_kernels_step.py                      # batch 1 4 16 64
    .venv/bin/python benchmarks/gguf_kernels_step.py --dense float16 --batch 1 8 --rounds 5
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
    p.add_argument("--dense", nargs="+", default=["float32", "float16"], help="dense dtypes to compare")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=8, help="steps per measurement (median taken)")
    args = p.parse_args()
    for batch in args.batch:
        steps = {
            "blocks": tandem_step("auto", batch, args.context)[0],
            "exact float32": tandem_step("float32", batch, args.context)[0],  # cpu_exact.c
        }
        for dtype in args.dense:
            steps[f"dense {dtype}"] = tandem_step(dtype, batch, args.context, gguf_cpu_kernels=False)[0]
        ratios: dict[str, list[float]] = {name: [] for name in steps if name != "blocks"}
        print(f"batch {batch}, context {args.context}: ms per decode step (median of {args.iters})")
        for r in range(args.rounds):
            ms = {name: time_steps(step, args.iters) for name, step in steps.items()}
            for name in ratios:
                ratios[name].append(ms[name] / ms["blocks"])
            print(f"  round {r + 1}: " + "  ".join(f"{name} {v:7.1f}" for name, v in ms.items()), flush=True)
        for name, values in ratios.items():
            print(f"  median {name} / blocks: {sorted(values)[len(values) // 2]:.2f}")
        del steps


if __name__ == "__main__":
    main()
