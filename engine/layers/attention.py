"""Attention front for a decoder layer: store this step's K/V in the paged cache, then attend."""

from __future__ import annotations

from torch import Tensor, nn

from engine.attention import AttentionMetadata
from engine.kernels import dispatch


class Attention(nn.Module):
    """Owns no weights: only the head layout and the softmax scale."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, meta: AttentionMetadata) -> Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D]; kv_cache [2, num_blocks, block_size, Hkv, D] -> [T, Hq * D]."""
        dispatch.write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        out = dispatch.paged_attention(q, kv_cache, meta, self.scale)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
