"""The collectives sharded layers call, on the process's default torch.distributed group (one engine's
ranks: an engine process joins exactly one group)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sums the ranks' partial results in place (row-parallel outputs, vocab-parallel lookups)."""
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: Tensor) -> Tensor:
    """[..., n] on each rank -> [..., size * n], rank order (vocab-parallel logits)."""
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, x.contiguous())
    return torch.cat(pieces, dim=-1)
