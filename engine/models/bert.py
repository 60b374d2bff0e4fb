"""BERT encoder (sentence-transformers' MiniLM, BGE, E5...): token + position + type embeddings, post-LN
layers, GELU, bidirectional attention over each sequence of a flat batch. No KV cache: a sequence is
encoded in one step. Module names follow Hugging Face's, so checkpoints load by name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    torch_dtype: str = "float32"

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> BertConfig:
        act = str(config.get("hidden_act", "gelu"))
        if act not in _ACTIVATIONS:
            raise ValueError(f"BERT activation {act!r} is not supported (supported: {sorted(_ACTIVATIONS)})")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported for BERT models")
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            intermediate_size=int(config["intermediate_size"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        )


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor, token_type_ids: Tensor) -> Tensor:
        """[T] ids, positions, types -> [T, H]"""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class SequenceLayout:
    """Where each sequence of a flat batch sits, to scatter it into a padded [B, L] grid and back."""

    def __init__(self, seq_lens: list[int], device: torch.device) -> None:
        self.seq_lens = seq_lens
        max_len = max(seq_lens)
        starts = torch.tensor([0, *seq_lens[:-1]], device=device).cumsum(0)
        offsets = torch.arange(max_len, device=device)
        lens = torch.tensor(seq_lens, device=device)
        self.valid = offsets[None, :] < lens[:, None]  # [B, L]
        # Padded slots point at row 0; their values are masked as keys and dropped as queries.
        self.flat_index = torch.where(self.valid, starts[:, None] + offsets[None, :], 0)  # [B, L]
        self.key_mask = self.valid[:, None, None, :]  # [B, 1, 1, L] for SDPA: True = attend


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _padded_heads(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        """[T, H] -> [B, heads, L, D]"""
        padded = x[layout.flat_index]  # [B, L, H]
        b, length, _ = padded.shape
        return padded.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        q = self._padded_heads(self.query(x), layout)
        k = self._padded_heads(self.key(x), layout)
        v = self._padded_heads(self.value(x), layout)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.key_mask)  # [B, heads, L, D]
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)  # [B, L, H]
        return out[layout.valid]  # [T, H], sequences back in flat order


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)  # Hugging Face's name, kept for checkpoint loading
        self.output = BertSelfOutput(cfg)

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        return self.output(self.self(x, layout), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertLayer(nn.Module):
    """Post-LN: each sub-block adds its residual and then normalizes."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        for layer in self.layer:
            x = layer(x, layout)
        return x


class BertModel(nn.Module):
    # Checkpoint tensors we do not use: the NSP pooler and the buffered position ids.
    IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids", "cls.")

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: Tensor, seq_lens: list[int], token_type_ids: Tensor | None = None) -> Tensor:
        """Flat batch of sequences [T] (lengths `seq_lens`) -> last hidden states [T, H]."""
        device = input_ids.device
        positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        layout = SequenceLayout(seq_lens, device)
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids), layout)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Loads Hugging Face-named tensors (with or without a `bert.` prefix); raises on a mismatch."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("bert.")
            if name.startswith(self.IGNORED_PREFIXES):
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in BertModel")
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
            param.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
