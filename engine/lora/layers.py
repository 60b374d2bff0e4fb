"""Batched LoRA on a built model, applied from outside: each adapted projection is wrapped so that a step
whose tokens use different adapters (and the base model) runs as one batch.

Every wrapper holds --max-loras slots of zero-padded A and B matrices. One step computes, for all tokens,
h = x @ A_all^T over the slots, zeroes the columns of the slots a token does not use (a mask built once
per step from the runner's per-token slots, shared by all layers), and adds h @ B to the base output. At
decode sizes a thin matmul costs mostly its call (oneDNN's fixed ~15-25 us) and its bytes, so a step
makes few calls, whatever the mix of adapters:

- the shrink runs in the base layer's matmul: the A rows sit under the base weight in one tensor [W; A]
  and the base layer's weight is a view of its first rows, so a step without adapter tokens runs the
  base layer alone, as before, and a step with some gets the base output and h from one call;
- one multiply applies the mask; one matmul expands every part at once against B laid out
  block-diagonally by part (q/k/v, gate/up): the zero blocks are a few hundred KB, and one call measured
  no slower than a matmul per part and a cat (benchmarks/RESULTS.md); one add puts the result on the base output (measured 10-20 us cheaper
  than addmm on the view at these shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.layers import row_routed
from engine.layers.linear import Linear, MergedLinear
from engine.lora.adapter import TargetModule

# Tandem module leaf names that LoRA adapts (q/k/v are parts of qkv_proj, gate/up of gate_up_proj).
WRAPPED_LEAVES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# On CPU, steps of at most this many tokens run the LoRA expands on one thread: at decode sizes waking
# the other OpenMP threads (passive waiting, engine/cpu_threads.py) cost more than they gave (measured on
# the 2-vCPU Zen 4 VM: 80 vs 103 us for one projection's LoRA at 8 rows).
MAX_SINGLE_THREAD_ROWS = 64


class LoraBatch:
    """The step's adapter selection, set by the runner before each forward and read by every wrapper."""

    def __init__(self, max_loras: int, max_rank: int) -> None:
        self.max_loras = max_loras
        self.max_rank = max_rank
        # [T, S]: 1 where token t uses slot s; None: no token of the step uses an adapter.
        self.token_slots: Tensor | None = None
        self._masks: dict[int, Tensor] = {}

    def set_step(self, token_slots: Tensor | None) -> None:
        self.token_slots = token_slots
        self._masks.clear()

    def mask_for(self, num_parts: int) -> Tensor | None:
        """[T, P * S * R]: the token's slot columns of a P-part projection (h is part-major: part, slot,
        rank), built once per step for each part count."""
        if self.token_slots is None:
            return None
        mask = self._masks.get(num_parts)
        if mask is None:
            per_slot = self.token_slots.repeat_interleave(self.max_rank, dim=1)  # [T, S * R]
            mask = per_slot.repeat(1, num_parts)
            self._masks[num_parts] = mask
        return mask


def expand_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of B (and of the mask, so of h in the expand): float32 for a float16 model on CPU, whose
    float16 GEMM at a few rows has no fast kernel (8 x 128 x 3072: 6.3 ms in float16, 0.15 ms through
    float32 on the Zen 4 VM; benchmarks/RESULTS.md), else the model's dtype."""
    return torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype


def _fusable(base: nn.Module) -> bool:
    """Whether the base layer is a plain linear whose weight (and bias) can become a view of [W; A]; other
    layers (the int8 decode copies, tensor-parallel shards) keep their weight and a separate shrink."""
    return type(base) in (nn.Linear, Linear, MergedLinear)


class LoraLinear(nn.Module):
    """base(x) + sum over the token's slot of (x @ A^T) @ (scale * B)^T, for each output part."""

    def __init__(self, base: nn.Module, target: TargetModule, batch: LoraBatch, weight: Tensor) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        # The model splits merged outputs by these sizes (LlamaAttention.split_heads).
        self.output_sizes = list(target.output_sizes)
        self.num_out = sum(self.output_sizes)
        width = batch.max_loras * batch.max_rank  # S * R: one part's columns of h
        num_a = len(self.output_sizes) * width
        dtype, device = weight.dtype, weight.device
        self.fused = _fusable(base)
        self.a_start = self.num_out if self.fused else 0
        # A rows ordered (part, slot, rank) after the base's:
        # [N + P * S * R, in] = [W; A] when fused, else [P * S * R, in] = A.
        self.stacked: Tensor
        self.stacked_bias: Tensor | None = None  # [N + P * S * R]: the base bias, then zeros
        self.lora_b: Tensor  # every part's B, one after the other (see parts_b)
        with torch.no_grad():
            lora_a = torch.zeros(num_a, target.in_features, dtype=dtype, device=device)
            self.register_buffer("stacked", torch.cat([weight, lora_a]) if self.fused else lora_a)
            if self.fused:
                # The base layer keeps running base-only steps, from views of the stacked tensors
                # (nothing may move the model to another device after this: the views would part).
                base.weight = nn.Parameter(self.stacked[: self.num_out], requires_grad=False)
                bias: Tensor | None = base.bias  # type: ignore[assignment]
                if bias is not None:
                    self.stacked_bias = torch.cat([bias, bias.new_zeros(num_a)])
                    base.bias = nn.Parameter(self.stacked_bias[: self.num_out], requires_grad=False)
        # B^T of every part and slot, block-diagonal by part: [P * S * R, out], row block (p, s) holds slot
        # s's scaled B^T of part p in part p's columns, zeros elsewhere. One addmm expands every part and
        # adds the base output; the zero blocks cost less than a matmul call per part and a cat.
        self.register_buffer(
            "lora_b", torch.zeros(num_a, self.num_out, dtype=expand_dtype(dtype, device), device=device)
        )
        # Part p's [S * R, out_p] block of lora_b (a view: set_slot writes through it).
        self.parts_b: list[Tensor] = []
        start = 0
        for part, size in enumerate(self.output_sizes):
            self.parts_b.append(self.lora_b[part * width : (part + 1) * width, start : start + size])
            start += size

    @property
    def lora_a(self) -> Tensor:
        """[P * S * R, in]: every slot's A rows (a view of the stacked weight)."""
        return self.stacked[self.a_start :]

    def forward(self, x: Tensor) -> Tensor:
        """x [T, in] -> [T, out]"""
        mask = self.batch.mask_for(len(self.output_sizes))
        if mask is None:
            return self.base(x)
        if self.fused:
            # [T, out + P * S * R]: the base output, then h
            y = row_routed.linear(x, self.stacked, self.stacked_bias)
            out, shrunk = y[:, : self.num_out], y[:, self.num_out :]
        else:
            out, shrunk = self.base(x), row_routed.linear(x, self.lora_a)
        num_threads = torch.get_num_threads()
        one_thread = x.device.type == "cpu" and x.shape[0] <= MAX_SINGLE_THREAD_ROWS and num_threads > 1
        if one_thread:
            torch.set_num_threads(1)
        try:
            # (h masked to each token's slot) @ B, plus the base output (cheaper than addmm on the view);
            # a float16 model's h becomes float32 in the multiply by the float32 mask (see expand_dtype).
            delta = torch.mm(shrunk * mask, self.lora_b).add_(out)
            return delta if delta.dtype == out.dtype else delta.to(out.dtype)
        finally:
            if one_thread:
                torch.set_num_threads(num_threads)

    @torch.no_grad()
    def set_slot(self, slot: int, pairs: list[tuple[Tensor, Tensor] | None] | None) -> None:
        """Writes one adapter's (A [r, in], scaled B [out_p, r]) per part into a slot (None: zeros)."""
        rank_max, width = self.batch.max_rank, self.batch.max_loras * self.batch.max_rank
        for part, part_b in enumerate(self.parts_b):
            rows_a = self.lora_a[part * width + slot * rank_max : part * width + (slot + 1) * rank_max]
            rows_b = part_b[slot * rank_max : (slot + 1) * rank_max]
            rows_a.zero_()
            rows_b.zero_()
            pair = pairs[part] if pairs is not None else None
            if pair is not None:
                part_a, scaled_b = pair
                rank = part_a.shape[0]
                rows_a[:rank] = part_a.to(rows_a.dtype)
                rows_b[:rank] = scaled_b.t().to(rows_b.dtype)


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
