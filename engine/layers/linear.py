"""Linear layers: routed by row count for float16 on CPU, merged outputs (q/k/v, gate/up in one matmul),
and the tensor-parallel variants that hold one rank's columns or rows of a projection."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from engine.distributed.comm import all_reduce_sum
from engine.layers import row_routed

if TYPE_CHECKING:
    from engine.layers.gguf_packed import ExactPackedWeight, PackedWeight


class Linear(nn.Linear):
    """nn.Linear whose float16 products on CPU are routed by row count (engine/layers/row_routed.py);
    same `weight`, `bias` and results as nn.Linear otherwise. A GGUF model on CPU may also give it its
    weight's quantized blocks (engine/layers/gguf_packed.py), used by steps of few rows."""

    packed_weight: PackedWeight | ExactPackedWeight | None = None

    def forward(self, x: Tensor) -> Tensor:
        packed = self.packed_weight
        if packed is not None and x.shape[0] <= packed.max_rows:
            return packed.linear(x, self.bias)
        return row_routed.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
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


class ColumnParallelLinear(MergedLinear):
    """One rank's output rows of each part: `part_starts[i]` is where this rank's rows of part i begin in
    the checkpoint tensor, `output_sizes[i]` how many it holds. No collective: the next layer consumes the
    sharded output (attention heads, the gated activation) and a RowParallelLinear reduces it."""

    def __init__(self, in_features: int, output_sizes: list[int], part_starts: list[int], bias: bool) -> None:
        super().__init__(in_features, output_sizes, bias)
        self.part_starts = list(part_starts)

    def load_shard(self, name: str, loaded: Tensor, shard_index: int) -> None:
        rows = loaded.narrow(0, self.part_starts[shard_index], self.output_sizes[shard_index])
        super().load_shard(name, rows, shard_index)


class RowParallelLinear(Linear):
    """One rank's input columns [input_start, input_start + in_features); the partial products of all
    ranks are summed by an all-reduce. Only rank 0 adds the bias, so the sum adds it once."""

    def __init__(self, in_features: int, out_features: int, input_start: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.input_start = input_start

    def shard_checkpoint_tensor(self, name: str, loaded: Tensor) -> Tensor:
        if name == "bias":
            return loaded
        return loaded.narrow(1, self.input_start, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """x [T, in/N] -> [T, out], summed over ranks."""
        out = row_routed.linear(x, self.weight, self.bias if self.input_start == 0 else None)
        return all_reduce_sum(out)
