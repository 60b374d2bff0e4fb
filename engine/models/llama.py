"""Llama family (Llama 2/3/3.1, SmolLM, Mistral): the decoder that the other families extend."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from engine.attention import AttentionMetadata
from engine.distributed.shard import TensorParallel, head_shard
from engine.layers.activation import GatedMLP
from engine.layers.attention import Attention
from engine.layers.embedding import LMHead, ParallelLMHead, VocabEmbedding, VocabParallelEmbedding
from engine.layers.linear import ColumnParallelLinear, Linear, MergedLinear, RowParallelLinear
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
    def __init__(
        self, arch: ModelArchConfig, rotary_emb: RotaryEmbedding, tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        self.head_dim = d = arch.head_dim
        self.qkv_proj: MergedLinear
        self.o_proj: nn.Linear
        if tp is None:
            self.num_heads = arch.num_attention_heads
            self.num_kv_heads = arch.num_key_value_heads
            q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
            self.qkv_proj = MergedLinear(arch.hidden_size, [q_size, kv_size, kv_size], arch.attention_bias)
            self.o_proj = Linear(q_size, arch.hidden_size, bias=False)
        else:  # this rank's whole KV groups: attention needs no collective, o_proj sums the ranks
            heads = head_shard(tp, arch.num_attention_heads, arch.num_key_value_heads)
            self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
            q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
            starts = [heads.q_lo * d, heads.kv_lo * d, heads.kv_lo * d]
            self.qkv_proj = ColumnParallelLinear(
                arch.hidden_size, [q_size, kv_size, kv_size], starts, arch.attention_bias
            )
            self.o_proj = RowParallelLinear(q_size, arch.hidden_size, heads.q_lo * d, bias=False)
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

    def __init__(
        self, arch: ModelArchConfig, rotary_emb: RotaryEmbedding, tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(arch, rotary_emb, tp)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, tp)
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
    def __init__(
        self, arch: ModelArchConfig, layer_cls: type[LlamaDecoderLayer], tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        self.embed_tokens: nn.Embedding
        if tp is None:
            self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size)
        else:
            lo, hi, rows = tp.padded_split(arch.vocab_size)
            self.embed_tokens = VocabParallelEmbedding(rows, arch.hidden_size, lo, hi)
        # One cos/sin table for all layers: at 128k positions it is tens of MB.
        self.rotary_emb = RotaryEmbedding(
            arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling
        )
        self.layers = nn.ModuleList(
            layer_cls(arch, self.rotary_emb, tp) for _ in range(arch.num_hidden_layers)
        )
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

    def __init__(self, arch: ModelArchConfig, tp: TensorParallel | None = None) -> None:
        """tp: build this rank's shard of every sharded layer (None: the whole model, plain layers)."""
        super().__init__()
        self.arch = arch
        self.tp = tp
        self.model = LlamaModel(arch, self.layer_cls, tp)
        tied = self.model.embed_tokens if arch.tie_word_embeddings else None
        if tp is None:
            self.lm_head = LMHead(arch.hidden_size, arch.vocab_size, tied)
        else:
            shard = tp.padded_split(arch.vocab_size)
            self.lm_head = ParallelLMHead(arch.hidden_size, arch.vocab_size, shard, tied)  # type: ignore[arg-type]

    @property
    def num_kv_heads(self) -> int:
        """KV heads this model keeps in its cache: under tensor parallelism, this rank's."""
        if self.tp is None:
            return self.arch.num_key_value_heads
        return head_shard(self.tp, self.arch.num_attention_heads, self.arch.num_key_value_heads).num_kv_heads

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
            shard = getattr(modules[module_path], "shard_checkpoint_tensor", None)
            if shard is not None:  # a tensor-parallel layer: keep this rank's rows or columns only
                tensor = shard(leaf, tensor)
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
