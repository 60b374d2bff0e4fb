"""Weight-only int8 matmuls for the few-row (decode) steps of a bf16 model on CPU, applied to a built
model from outside (the model files know nothing of it).

At one to a few rows a decode step reads every weight once and does little arithmetic with it, so it is
bound by bytes: torch's `_weight_int8pack_mm` (int8 weights, one scale per output row, bf16 activations)
ran the 30 layers of the default model 1.85x faster than the bf16 matmuls at 1 row, 1.5x at 4, and slower
from about 8 rows on (benchmarks/RESULTS.md). So each layer keeps its bf16 weight for bigger batches and
prefill, and an int8 copy (half the bytes) for small ones. Lossy: see benchmarks/int8_fidelity.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_MAX_INT8_ROWS = 4  # measured crossover: int8 faster up to ~4-8 rows, bf16 beyond


class Int8DecodeLinear(nn.Module):
    def __init__(self, linear: nn.Linear, max_int8_rows: int) -> None:
        super().__init__()
        self.weight = linear.weight  # [N, K], for batches above max_int8_rows
        self.bias = linear.bias
        self.max_int8_rows = max_int8_rows
        # Merged projections (qkv, gate/up) keep the part sizes the model splits their output by.
        self.output_sizes: list[int] | None = getattr(linear, "output_sizes", None)
        with torch.no_grad():
            w = linear.weight.float()
            scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [N]: symmetric, per output row
            self.qweight: Tensor
            self.scales: Tensor
            self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scales", scales.to(linear.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """x [T, K] -> [T, N]."""
        if x.shape[0] > self.max_int8_rows:
            return F.linear(x, self.weight, self.bias)
        out = torch._weight_int8pack_mm(x, self.qweight, self.scales)
        return out if self.bias is None else out + self.bias


def use_int8_for_small_batches(model: nn.Module, max_int8_rows: int = DEFAULT_MAX_INT8_ROWS) -> int:
    """Wraps every nn.Linear of the decoder layers (not the LM head, not embeddings); returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, module in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, Int8DecodeLinear(module, max_int8_rows))  # type: ignore[arg-type]
    return len(targets)
