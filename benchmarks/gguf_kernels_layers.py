"""The default model's linear layers alone: all 30 layers' block products (engine/layers/gguf_packed.py)
against their dense float32 and float16 matmuls, and the LM head's, per row count, best of a few rounds.
The dense weights are the model's own (the same values the blocks hold), read from memory every time.

    .venv/bin/python benchmarks/gguf_kernels_layers.py
    .venv/bin/python benchmarks/gguf_kernels_layers.py --rows 1 4 16 32 64 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    from engine.cpu_threads import configure_openmp

    configure_openmp()
    import torch
    import torch.nn.functional as F

    from engine.layers import row_routed
    from engine.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = load_model(None).model  # --dtype auto: float32 activations, the blocks attached
    layers = [m for m in model.model.modules() if getattr(m, "packed_weight", None) is not None]
    head = model.lm_head.packed_weight
    assert head is not None and layers, "the block kernels did not build here"
    dense16 = [m.weight.half() for m in layers]
    head16 = model.lm_head.weight.half()
    print(
        f"{len(layers)} layers; threads {torch.get_num_threads()}; ms for all layers (best of {args.rounds})"
    )
    print(
        f"{'rows':>4} {'blocks':>8} {'dense f32':>10} {'dense f16':>10} | {'head blocks':>11} {'f32':>7} {'f16':>7}"
    )

    def measure(rows: int) -> list[float]:
        """ms: blocks, dense float32, dense float16 for the layers; the same three for the head."""
        xs = {k: torch.randn(rows, k) for k in {m.in_features for m in layers}}
        h = xs[head.shape[1]]
        return [
            best_ms(lambda: [m.packed_weight.linear(xs[m.in_features], None) for m in layers], args.rounds),
            best_ms(lambda: [F.linear(xs[m.in_features], m.weight) for m in layers], args.rounds),
            best_ms(lambda: [row_routed.linear(xs[w.shape[1]].half(), w) for w in dense16], args.rounds),
            best_ms(lambda: head.logits(h), args.rounds),
            best_ms(lambda: F.linear(h, model.lm_head.weight), args.rounds),
            best_ms(lambda: row_routed.lm_head_logits(h.half(), head16), args.rounds),
        ]

    with torch.inference_mode():
        for rows in args.rows:
            b, f32, f16, hb, h32, h16 = measure(rows)
            print(
                f"{rows:>4} {b:>8.1f} {f32:>10.1f} {f16:>10.1f} | {hb:>11.1f} {h32:>7.1f} {h16:>7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
