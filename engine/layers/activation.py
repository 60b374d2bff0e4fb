"""The gated SiLU MLP of Llama-style models, with gate and up projections in one matmul."""

from __future__ import annotations

from torch import Tensor, nn

from engine.distributed.shard import TensorParallel
from engine.kernels import dispatch
from engine.layers.linear import ColumnParallelLinear, Linear, MergedLinear, RowParallelLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.gate_up_proj: MergedLinear
        self.down_proj: nn.Linear
        if tp is None:
            self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias=False)
            self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        else:  # this rank's FFN columns: gate/up by output rows, down_proj by input columns
            lo, hi = tp.split(intermediate_size)
            self.gate_up_proj = ColumnParallelLinear(hidden_size, [hi - lo, hi - lo], [lo, lo], bias=False)
            self.down_proj = RowParallelLinear(hi - lo, hidden_size, lo, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(dispatch.silu_and_mul(self.gate_up_proj(x)))
