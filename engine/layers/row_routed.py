"""float16 weights on CPU, each matmul routed by its row count.

On CPUs without AVX512-FP16 (the project's Zen 4: AVX512-BF16 and VNNI only) ATen's float16
matrix-vector product converts weights to float32 in registers and runs near memory bandwidth, about 2x
the bfloat16 GEMV at one row; but its float16 GEMM at many rows has no fast kernel and is 3-8x slower
than bfloat16. So steps of at most MAX_FP16_ROWS rows multiply the float16 weight directly, and larger
ones upcast the weight to float32 for the call and run float32's GEMM (no second copy kept: a float32
copy measured no faster and would cost 4 more bytes per weight; benchmarks/RESULTS.md).
Both paths accumulate in float32, so float16 keeps its fidelity (issue 14's bound) at every batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows up to which the float16 kernel beats the float32 upcast: whole decode steps at 2, 3 and 4 rows were
# 1.1-2.4x faster with it on Zen 4; at 8 rows the matmuls alone were 1.3x slower (benchmarks/RESULTS.md).
# A module global so that benchmarks can force one path for every row count.
MAX_FP16_ROWS = 4
LM_HEAD_BLOCK = 2048  # LM-head rows upcast per float32 matmul: 4.7 MB of float32, cache-sized


def routed(x: Tensor, weight: Tensor) -> bool:
    """Whether this product takes the upcast path: float16 on CPU, more rows than MAX_FP16_ROWS."""
    return weight.dtype == torch.float16 and not weight.is_cuda and x.shape[0] > MAX_FP16_ROWS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, except that float16 on CPU at many rows multiplies in float32 (result float16)."""
    if not routed(x, weight):
        return F.linear(x, weight, bias)
    return wide_linear(x, weight, bias)


def wide_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def lm_head_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """hidden [N, H] float16 -> float32 logits [N, vocab] against a float16 [vocab, H] head."""
    if not routed(hidden, weight):
        return F.linear(hidden, weight).float()
    # The tall head upcast at once would be a 113 MB float32 temporary per step; blocks stay in cache.
    h = hidden.float()
    return torch.cat([F.linear(h, w.float()) for w in weight.split(LM_HEAD_BLOCK)], dim=-1)
