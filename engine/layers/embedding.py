"""Token embedding and the LM head (optionally sharing the embedding's weight)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

_CPU_VOCAB_BLOCK = 8192  # LM-head rows per matmul on CPU in low precision


class VocabEmbedding(nn.Embedding):
    """[T] int64 token ids -> [T, H]."""


class LMHead(nn.Module):
    def __init__(
        self, hidden_size: int, vocab_size: int, tied_embedding: VocabEmbedding | None = None
    ) -> None:
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
        if hidden.is_cuda or hidden.dtype == torch.float32:
            return torch.nn.functional.linear(hidden, self.weight).float()
        # oneDNN's bf16 product with the whole tall [vocab, H] weight at a few rows runs far below memory
        # bandwidth on CPU; the same product in row blocks gives bit-identical logits 3-4x faster
        # (49,152 x 576 at 1 and 16 rows, benchmarks/RESULTS.md).
        parts = [torch.nn.functional.linear(hidden, w) for w in self.weight.split(_CPU_VOCAB_BLOCK)]
        return torch.cat(parts, dim=-1).float()
