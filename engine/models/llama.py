"""Llama family (Llama 2/3/3.1, SmolLM, Mistral): the decoder that the other families extend."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from engine.attention import AttentionMetadata
from engine.layers.activation import GatedMLP
from engine.layers.attention import Attention
from engine.layers.embedding import LMHead, VocabEmbedding
from engine.layers.linear import MergedLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelArchConfig

# checkpoint projection -> (our merged module, part index)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArchConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(arch.hidden_size, [q_size, kv_size, kv_size], bias=arch.attention_bias)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=False)
        self.rotary_emb = rotary_emb  # shared by all layers
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """qkv [T, (Hq + 2 Hkv) D] -> q [T, Hq, D], k and v [T, Hkv, D]."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split(self.qkv_proj.output_sizes, dim=-1)
        return (
            q.view(num_tokens, self.num_heads, self.head_dim),
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
        )

    def forward(self, positions: Tensor, x: Tensor, kv_cache: Tensor, meta: AttentionMetadata) -> Tensor:
        q, k, v = self.split_heads(self.qkv_proj(x))
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, arch: ModelArchConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(arch, rotary_emb)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self,
        positions: Tensor,
        hidden: Tensor,
        residual: Tensor | None,
        kv_cache: Tensor,
        meta: AttentionMetadata,
    ) -> tuple[Tensor, Tensor]:
        # The residual add is fused into the next norm: returns (this layer's output, running residual).
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchConfig, layer_cls: type[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size)
        # One cos/sin table for all layers: at 128k positions it is tens of MB.
        self.rotary_emb = RotaryEmbedding(
            arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling
        )
        self.layers = nn.ModuleList(layer_cls(arch, self.rotary_emb) for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self, positions: Tensor, hidden: Tensor, kv_caches: list[Tensor], meta: AttentionMetadata
    ) -> Tensor:
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        if residual is None:
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, arch: ModelArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, self.layer_cls)
        tied = self.model.embed_tokens if arch.tie_word_embeddings else None
        self.lm_head = LMHead(arch.hidden_size, arch.vocab_size, tied)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        """[T] -> [T, H]"""
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[Tensor],
        attn_metadata: AttentionMetadata,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Final-normed hidden states [T, H] for a flat mixed batch of T tokens."""
        hidden = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        return self.model(positions, hidden, kv_caches, attn_metadata)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """[N, H] -> [N, vocab] float32"""
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Loads Hugging Face-named tensors; raises ValueError on unknown, misshapen or missing ones."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue  # some tied checkpoints still store a copy
            module_path, _, leaf = name.rpartition(".")
            parent, _, proj = module_path.rpartition(".")
            if proj in STACKED_PARAMS:
                merged, index = STACKED_PARAMS[proj]
                module = modules.get(f"{parent}.{merged}")
                if not isinstance(module, MergedLinear):
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                module.load_shard(leaf, tensor, index)
                loaded.add(f"{parent}.{merged}.{leaf}#{index}")
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
            param.copy_(tensor)
            loaded.add(name)
        self._check_all_loaded(list(params), modules, loaded)

    def _check_all_loaded(
        self, param_names: list[str], modules: dict[str, nn.Module], loaded: set[str]
    ) -> None:
        expected: set[str] = set()
        for name in param_names:
            module_path, _, leaf = name.rpartition(".")
            module = modules[module_path]
            if isinstance(module, MergedLinear):
                expected.update(f"{name}#{i}" for i in range(len(module.output_sizes)))
            else:
                expected.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral's dense models are Llama with GQA; sliding windows beyond the context are not modelled."""
