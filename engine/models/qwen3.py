"""Qwen3 family: the Llama decoder with a per-head RMSNorm on q and k before rotary."""

from __future__ import annotations

from torch import Tensor

from engine.attention import AttentionMetadata
from engine.distributed.shard import TensorParallel
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelArchConfig
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(
        self, arch: ModelArchConfig, rotary_emb: RotaryEmbedding, tp: TensorParallel | None = None
    ) -> None:
        super().__init__(arch, rotary_emb, tp)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)

    def forward(self, positions: Tensor, x: Tensor, kv_cache: Tensor, meta: AttentionMetadata) -> Tensor:
        q, k, v = self.split_heads(self.qkv_proj(x))
        num_tokens = q.shape[0]
        # Normalize each head's vector: flatten heads into rows for the [rows, D] norm op.
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
