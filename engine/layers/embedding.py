"""Token embedding and the LM head (optionally sharing the embedding's weight), and their
vocabulary-parallel variants: each rank holds ceil(vocab / N) rows, the last rank's padded with zeros."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from engine.distributed.comm import all_gather_last_dim, all_reduce_sum
from engine.layers import row_routed

if TYPE_CHECKING:
    from engine.layers.gguf_packed import ExactPackedWeight, PackedWeight

_CPU_VOCAB_BLOCK = 8192  # LM-head rows per matmul on CPU in bfloat16


class VocabEmbedding(nn.Embedding):
    """[T] int64 token ids -> [T, H]."""


class LMHead(nn.Module):
    packed_weight: PackedWeight | ExactPackedWeight | None = (
        None  # a GGUF head's blocks on CPU (engine/layers/gguf_packed.py)
    )

    def __init__(self, hidden_size: int, vocab_size: int, tied_embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        self.tied = tied_embedding is not None
        if tied_embedding is not None:
            # Same Parameter object, so loading or casting the embedding updates the head too.
            self.weight = tied_embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [N, H] -> logits [N, vocab] float32."""
        packed = self.packed_weight
        if packed is not None and hidden.shape[0] <= packed.max_rows:
            return packed.logits(hidden)
        if hidden.is_cuda or hidden.dtype == torch.float32:
            return torch.nn.functional.linear(hidden, self.weight).float()
        if self.weight.dtype == torch.float16:
            # ATen's float16 GEMV runs the whole head near bandwidth at a few rows; more rows upcast.
            return row_routed.lm_head_logits(hidden, self.weight)
        # oneDNN's bf16 product with the whole tall [vocab, H] weight at a few rows runs far below memory
        # bandwidth on CPU; the same product in row blocks gives bit-identical logits 3-4x faster
        # (49,152 x 576 at 1 and 16 rows, benchmarks/RESULTS.md).
        parts = [torch.nn.functional.linear(hidden, w) for w in self.weight.split(_CPU_VOCAB_BLOCK)]
        return torch.cat(parts, dim=-1).float()


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_end) of the table; ids outside them look up zeros, and the all-reduce
    adds the one rank's row that holds each id."""

    def __init__(self, num_rows: int, embedding_dim: int, vocab_start: int, vocab_end: int) -> None:
        super().__init__(num_rows, embedding_dim)
        self.vocab_start = vocab_start
        self.vocab_end = vocab_end

    def shard_checkpoint_tensor(self, name: str, loaded: Tensor) -> Tensor:
        return _vocab_rows(loaded, self.vocab_start, self.vocab_end, self.num_embeddings)

    def forward(self, input_ids: Tensor) -> Tensor:
        """[T] -> [T, H]"""
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = nn.functional.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return all_reduce_sum(out)


class ParallelLMHead(LMHead):
    """This rank's logits slice, gathered from all ranks and cut back to the real vocabulary."""

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        shard: tuple[int, int, int],
        tied_embedding: VocabParallelEmbedding | None = None,
    ) -> None:
        self.vocab_start, self.vocab_end, num_rows = shard
        super().__init__(hidden_size, num_rows, tied_embedding)
        self.vocab_size = vocab_size

    def shard_checkpoint_tensor(self, name: str, loaded: Tensor) -> Tensor:
        return _vocab_rows(loaded, self.vocab_start, self.vocab_end, self.weight.shape[0])

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [N, H] -> logits [N, vocab] float32 on every rank."""
        return all_gather_last_dim(super().forward(hidden))[:, : self.vocab_size]


def _vocab_rows(loaded: Tensor, start: int, end: int, num_rows: int) -> Tensor:
    """Rows [start, end) of a [vocab, H] checkpoint tensor, zero-padded to num_rows."""
    rows = loaded.narrow(0, start, end - start)
    if end - start == num_rows:
        return rows
    padded = loaded.new_zeros((num_rows, *loaded.shape[1:]))
    padded[: end - start] = rows
    return padded
