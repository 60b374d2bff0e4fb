"""The gated SiLU MLP of Llama-style models, with gate and up projections in one matmul."""

from __future__ import annotations

from torch import Tensor, nn

from engine.kernels import dispatch
from engine.layers.linear import MergedLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(dispatch.silu_and_mul(self.gate_up_proj(x)))
