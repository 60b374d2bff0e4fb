"""Tensor parallelism's cost on CPU: one decode step of the default model at TP=1 and TP=2 (gloo), same
process, alternated, the same cores in total (TP=1: all threads in one process; TP=2: cores / 2 threads
in each of the two ranks). Prints median ms per step and the ratio TP=2 / TP=1 (above 1: TP=2 is slower).

A decode step of a 135M model on a few cores is mostly Python and small matmuls; TP adds per layer two
all-reduces (after o_proj and down_proj) plus the step's input broadcast and the logits all-gather, on
gloo over loopback TCP. On one CPU socket this can only cost time: TP exists to spread a model over
several devices' memory, not to speed up one CPU.

    .venv/bin/python -m benchmarks.tp_decode_step                       # bfloat16, batch 1 and 8
    .venv/bin/python -m benchmarks.tp_decode_step --dtype float32 --batch 1 4 --rounds 5
"""

from __future__ import annotations

import argparse
import os

from engine.cpu_threads import configure_openmp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence before timing")
    parser.add_argument("--iters", type=int, default=15, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of TP=1 and TP=2")
    args = parser.parse_args()
    configure_openmp()  # passive OpenMP waits, as an engine process (and the TP worker) runs them
    import torch

    from benchmarks.cpu_decode_step import tandem_step, time_steps

    cores = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {cores} cores, {args.dtype}, context {args.context}")
    half = max(1, cores // 2)
    # TP=1 twice: with all the cores' threads (what it runs by default) and with the threads of one rank
    # (the same per-process threads as TP=2, which isolates what the second rank and its collectives add).
    print(
        f"{'batch':>5} {'TP=1 ms':>8} {f'TP=1 {half}t ms':>11} {'TP=2 ms':>8} {'TP=2/TP=1':>10} {'TP=2/TP=1 ' + str(half) + 't':>13}"
    )
    for batch in args.batch:
        step1, _ = tandem_step(args.dtype, batch, args.context, num_threads=cores)
        step2, parts2 = tandem_step(args.dtype, batch, args.context, tensor_parallel_size=2)
        ms1, ms1_half, ms2 = [], [], []
        for _ in range(args.rounds):  # alternate, so that machine noise falls on all alike
            torch.set_num_threads(cores)
            ms1.append(time_steps(step1, args.iters))
            torch.set_num_threads(half)  # rank 0's share, as the engine sets it
            ms1_half.append(time_steps(step1, args.iters))
            ms2.append(time_steps(step2, args.iters))
        assert parts2.tp_workers is not None
        parts2.tp_workers.stop()  # one process group at a time
        b1, b1h, b2 = min(ms1), min(ms1_half), min(ms2)
        print(f"{batch:>5} {b1:>8.1f} {b1h:>11.1f} {b2:>8.1f} {b2 / b1:>10.2f} {b2 / b1h:>13.2f}")


if __name__ == "__main__":
    main()
