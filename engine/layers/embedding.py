"""Token embedding and the LM head (optionally sharing the embedding's weight)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
        return torch.nn.functional.linear(hidden, self.weight).float()
