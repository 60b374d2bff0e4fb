"""The ways a float16 model on CPU can run its matmuls, for benchmarks/dtype_step.py and
benchmarks/int8_fidelity.py to compare: `fp16_path(name)` sets engine/layers/row_routed.py's routing for
the duration of a `with` block.

    routed      the engine's default: float16 GEMV up to MAX_FP16_ROWS rows, float32 upcast above
    gemv-only   float16 products at every row count (ATen's float16 GEMM at many rows)
    upcast-only the float32 upcast at every row count
    bf16-wide   float16 GEMV at a few rows, a bfloat16 copy of each weight above (the copy made lazily
                here and kept; in an engine it would cost 2 bytes per weight)
    fp32-wide   float16 GEMV at a few rows, a float32 copy of each weight above (4 more bytes per weight)
    fp32-attn   routed, and attention (SDPA) computed in float32 instead of float16
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.layers import row_routed

PATHS = ("routed", "gemv-only", "upcast-only", "bf16-wide", "fp32-wide", "fp32-attn")
_copies: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}  # (id(weight), dtype) -> (weight, copy)
_sdpa = F.scaled_dot_product_attention


def _copy(weight: Tensor, dtype: torch.dtype) -> Tensor:
    entry = _copies.get((id(weight), dtype))
    if entry is None or entry[0] is not weight:
        entry = (weight, weight.to(dtype))
        _copies[(id(weight), dtype)] = entry
    return entry[1]


def _bf16_copy(weight: Tensor) -> Tensor:
    return _copy(weight, torch.bfloat16)


def _fp32_wide_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    b = None if bias is None else bias.float()
    return F.linear(x.float(), _copy(weight, torch.float32), b).to(x.dtype)


def _fp32_sdpa(q: Tensor, k: Tensor, v: Tensor, *args: object, **kwargs: object) -> Tensor:
    if q.dtype != torch.float16:
        return _sdpa(q, k, v, *args, **kwargs)  # type: ignore[arg-type]
    return _sdpa(q.float(), k.float(), v.float(), *args, **kwargs).half()  # type: ignore[arg-type]


def _bf16_wide_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    b = None if bias is None else bias.to(torch.bfloat16)
    return F.linear(x.to(torch.bfloat16), _bf16_copy(weight), b).to(x.dtype)


def _bf16_wide_head(hidden: Tensor, weight: Tensor) -> Tensor:
    if not row_routed.routed(hidden, weight):
        return F.linear(hidden, weight).float()
    h = hidden.to(torch.bfloat16)
    return torch.cat([F.linear(h, w) for w in _bf16_copy(weight).split(8192)], dim=-1).float()


@contextlib.contextmanager
def fp16_path(name: str) -> Iterator[None]:
    if name not in PATHS:
        raise ValueError(f"unknown float16 path {name!r} (known: {', '.join(PATHS)})")
    saved = (row_routed.MAX_FP16_ROWS, row_routed.wide_linear, row_routed.lm_head_logits)
    if name == "fp32-attn":
        F.scaled_dot_product_attention = _fp32_sdpa  # type: ignore[assignment]  # CPU attention calls it via F
    if name == "gemv-only":
        row_routed.MAX_FP16_ROWS = 1 << 30
    elif name == "upcast-only":
        row_routed.MAX_FP16_ROWS = 0
    elif name == "bf16-wide":
        row_routed.wide_linear = _bf16_wide_linear
        row_routed.lm_head_logits = _bf16_wide_head
    elif name == "fp32-wide":
        row_routed.wide_linear = _fp32_wide_linear
    try:
        yield
    finally:
        row_routed.MAX_FP16_ROWS, row_routed.wide_linear, row_routed.lm_head_logits = saved
        F.scaled_dot_product_attention = _sdpa
