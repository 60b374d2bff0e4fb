"""A linear layer whose output stacks several checkpoint projections (q/k/v, gate/up) for one matmul."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MergedLinear(nn.Linear):
    """nn.Linear over concatenated outputs; `output_sizes` records the parts so that loaders
    (and tensor-parallel sharding, applied from outside) can address each one."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)

    def shard_slice(self, shard_index: int) -> slice:
        start = sum(self.output_sizes[:shard_index])
        return slice(start, start + self.output_sizes[shard_index])

    @torch.no_grad()
    def load_shard(self, name: str, loaded: Tensor, shard_index: int) -> None:
        """Copies one checkpoint tensor (`name` is 'weight' or 'bias') into its rows."""
        target: Tensor = getattr(self, name)
        rows = self.shard_slice(shard_index)
        if target[rows].shape != loaded.shape:
            raise ValueError(
                f"{name} part {shard_index}: expected {tuple(target[rows].shape)}, got {tuple(loaded.shape)}"
            )
        target[rows].copy_(loaded)
