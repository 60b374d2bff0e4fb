"""The one place that picks Triton kernels for CUDA tensors and the CPU ops (cpu_ops: torch ops, a few of
them fused in C) otherwise.

Layers call only these functions; `triton_ops` is imported lazily because CPU hosts may lack it.
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor

from engine.attention import AttentionMetadata
from engine.kernels import cpu_ops


def _ops_for(x: Tensor) -> ModuleType:
    if x.is_cuda:
        from engine.kernels import triton_ops

        return triton_ops
    return cpu_ops


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _ops_for(x).rms_norm(x, weight, eps)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _ops_for(x).fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor, is_neox: bool
) -> tuple[Tensor, Tensor]:
    return _ops_for(q).rotary_embedding(positions, q, k, cos_sin_cache, is_neox)


def silu_and_mul(x: Tensor) -> Tensor:
    return _ops_for(x).silu_and_mul(x)


def write_kv_cache(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    _ops_for(k).write_kv_cache(k, v, kv_cache, slot_mapping)


def paged_attention(q: Tensor, kv_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    return _ops_for(q).paged_attention(q, kv_cache, meta, scale)
