"""The GPU kernels' public API (Triton); `dispatch.py` calls these for CUDA tensors, `torch_ops.py` mirrors them."""

from engine.kernels.triton_attention import paged_attention, should_split_kv
from engine.kernels.triton_elementwise import (
    fused_add_rms_norm,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
    write_kv_cache,
)

__all__ = [
    "fused_add_rms_norm",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "should_split_kv",
    "silu_and_mul",
    "write_kv_cache",
]
