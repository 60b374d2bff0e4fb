"""The LM head: on CPU in bf16 it multiplies in vocabulary blocks (speed); the logits must not change."""

from __future__ import annotations

import pytest
import torch

from engine.layers.embedding import _CPU_VOCAB_BLOCK, LMHead, VocabEmbedding


@pytest.mark.parametrize("num_rows", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocked_lm_head_matches_one_matmul(num_rows: int, dtype: torch.dtype) -> None:
    torch.manual_seed(num_rows)
    vocab = 2 * _CPU_VOCAB_BLOCK + 123  # three blocks, the last one short
    embedding = VocabEmbedding(vocab, 64).to(dtype)
    head = LMHead(64, vocab, tied_embedding=embedding)
    hidden = torch.randn(num_rows, 64, dtype=dtype)
    logits = head(hidden)
    assert logits.shape == (num_rows, vocab) and logits.dtype == torch.float32
    # Each logit is its own dot product, so blocking the rows of the weight changes no bits.
    assert torch.equal(logits, torch.nn.functional.linear(hidden, embedding.weight).float())
