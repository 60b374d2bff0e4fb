"""Batched LoRA on a built model, applied from outside: each adapted projection is wrapped so that a step
whose tokens use different adapters (and the base model) runs as one batch.

Every wrapper holds --max-loras slots of zero-padded A and B matrices. One step computes, for all tokens,
h = x @ A_all^T over the slots up to the highest one in use (one thin matmul), zeroes the columns of the
slots a token does not use (a mask built once per step from the runner's per-token slots, shared by all
layers), and adds h @ B_all to the base output (a second thin matmul). That is three torch ops per projection whatever the mix of adapters:
at decode sizes the cost of a matmul is mostly its call, so computing the unused slots' few columns
costs less than gathering each adapter's tokens apart. A step with no adapter tokens skips it all.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.lora.adapter import TargetModule

# Tandem module leaf names that LoRA adapts (q/k/v are parts of qkv_proj, gate/up of gate_up_proj).
WRAPPED_LEAVES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# On CPU, steps of at most this many tokens run the thin LoRA matmuls on one thread: at decode sizes
# waking the other OpenMP threads (passive waiting, engine/cpu_threads.py) cost more than they gave
# (measured on the 2-vCPU Zen 4 VM: 80 vs 103 us for one projection's LoRA at 8 rows).
MAX_SINGLE_THREAD_ROWS = 64


class LoraBatch:
    """The step's adapter selection, set by the runner before each forward and read by every wrapper."""

    def __init__(self, max_loras: int, max_rank: int) -> None:
        self.max_loras = max_loras
        self.max_rank = max_rank
        # [T, n]: 1 where token t uses slot s, for the first n slots (the highest one in use and those
        # below it); None: no token of the step uses an adapter.
        self.token_slots: Tensor | None = None
        self._masks: dict[int, Tensor] = {}

    def set_step(self, token_slots: Tensor | None) -> None:
        self.token_slots = token_slots
        self._masks.clear()

    def mask_for(self, num_parts: int) -> Tensor | None:
        """[T, n * P * R]: the token's slot columns of a P-part projection (rows are slot-major),
        built once per step for each part count."""
        if self.token_slots is None:
            return None
        mask = self._masks.get(num_parts)
        if mask is None:
            mask = self.token_slots.repeat_interleave(num_parts * self.max_rank, dim=1)
            self._masks[num_parts] = mask
        return mask


class LoraLinear(nn.Module):
    """base(x) + sum over the token's slot of (x @ A^T) @ (scale * B)^T, for each output part."""

    def __init__(self, base: nn.Module, target: TargetModule, batch: LoraBatch, weight: Tensor) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        # The model splits merged outputs by these sizes (LlamaAttention.split_heads).
        self.output_sizes = list(target.output_sizes)
        num_parts = len(self.output_sizes)
        width = batch.max_loras * batch.max_rank
        self.lora_a: Tensor
        self.lora_b: Tensor
        dtype, device = weight.dtype, weight.device
        # Rows ordered (slot, part, rank), so the first n slots are the first rows: [S * P * R, in]
        self.register_buffer(
            "lora_a", torch.zeros(num_parts * width, target.in_features, dtype=dtype, device=device)
        )
        # [S * P * R, out]: block-diagonal, part p's rows only reach part p's output columns
        self.register_buffer(
            "lora_b", torch.zeros(num_parts * width, sum(self.output_sizes), dtype=dtype, device=device)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [T, in] -> [T, out]"""
        out = self.base(x)
        mask = self.batch.mask_for(len(self.output_sizes))
        if mask is None:
            return out
        rows = mask.shape[1]  # only the slots up to the highest one in use
        num_threads = torch.get_num_threads()
        one_thread = x.device.type == "cpu" and x.shape[0] <= MAX_SINGLE_THREAD_ROWS and num_threads > 1
        if one_thread:
            torch.set_num_threads(1)
        try:
            h = torch.mm(x, self.lora_a[:rows].t()).mul_(mask)  # [T, n * P * R]
            return out.addmm_(h, self.lora_b[:rows])
        finally:
            if one_thread:
                torch.set_num_threads(num_threads)

    @torch.no_grad()
    def set_slot(self, slot: int, pairs: list[tuple[Tensor, Tensor] | None] | None) -> None:
        """Writes one adapter's (A [r, in], scaled B [out_p, r]) per part into a slot (None: zeros)."""
        rank_max = self.batch.max_rank
        first = slot * len(self.output_sizes) * rank_max
        col = 0
        for part, size in enumerate(self.output_sizes):
            rows = slice(first + part * rank_max, first + (part + 1) * rank_max)
            self.lora_a[rows] = 0
            self.lora_b[rows] = 0
            pair = pairs[part] if pairs is not None else None
            if pair is not None:
                lora_a, lora_b = pair
                rank = lora_a.shape[0]
                self.lora_a[rows][:rank] = lora_a.to(self.lora_a.dtype)
                self.lora_b[rows][:rank, col : col + size] = lora_b.t().to(self.lora_b.dtype)
            col += size


def wrap_model(model: nn.Module, batch: LoraBatch) -> dict[str, LoraLinear]:
    """Replaces every adaptable projection of a built model with a LoraLinear; returns them by path."""
    wrapped: dict[str, LoraLinear] = {}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in WRAPPED_LEAVES and not isinstance(module, LoraLinear)
    ]
    for name, module in targets:
        weight: Tensor = module.weight  # type: ignore[assignment]  # nn.Linear or a wrapper keeping it
        sizes = getattr(module, "output_sizes", None) or [weight.shape[0]]
        target = TargetModule(in_features=weight.shape[1], output_sizes=tuple(sizes))
        parent_name, _, leaf = name.rpartition(".")
        wrapper = LoraLinear(module, target, batch, weight)
        setattr(model.get_submodule(parent_name), leaf, wrapper)
        wrapped[name] = wrapper
    return wrapped


def target_modules(wrapped: dict[str, LoraLinear]) -> dict[str, TargetModule]:
    return {
        name: TargetModule(in_features=layer.lora_a.shape[1], output_sizes=tuple(layer.output_sizes))
        for name, layer in wrapped.items()
    }
