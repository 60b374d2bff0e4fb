"""LoraLinear against the plain formula, token by token: base(x) + (x @ A_s^T) @ B_s^T per output part for
the token's slot s, in each of its paths (the shrink fused into the base matmul or run apart, some slots
or all in use, one to three output parts, with a bias or not), and the base-only step left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from engine.layers.linear import MergedLinear
from engine.lora.adapter import TargetModule
from engine.lora.layers import LoraBatch, LoraLinear

MAX_LORAS, MAX_RANK, IN = 3, 4, 16
Pair = tuple[Tensor, Tensor]


class Opaque(nn.Module):
    """A base layer LoRA cannot fuse into (like the int8 decode copies): it keeps its own weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.weight = linear.weight
        self.output_sizes = getattr(linear, "output_sizes", None)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def build(sizes: list[int], *, bias: bool, fusable: bool, dtype: torch.dtype) -> tuple[LoraLinear, LoraBatch]:
    torch.manual_seed(0)
    linear = MergedLinear(IN, sizes, bias=bias).to(dtype)
    base: nn.Module = linear if fusable else Opaque(linear)
    batch = LoraBatch(MAX_LORAS, MAX_RANK)
    return LoraLinear(base, TargetModule(IN, tuple(sizes)), batch, linear.weight), batch


def adapter(sizes: list[int], rank: int, seed: int) -> list[Pair | None]:
    """Random (A [r, in], scaled B [out_p, r]) per part; the last part left out when there are several."""
    gen = torch.Generator().manual_seed(seed)
    pairs: list[Pair | None] = [
        (torch.randn(rank, IN, generator=gen), torch.randn(size, rank, generator=gen)) for size in sizes
    ]
    if len(sizes) > 1:
        pairs[-1] = None
    return pairs


def expected(x: Tensor, base_out: Tensor, sizes: list[int], pairs: list[Pair | None] | None) -> Tensor:
    """One token's output in float64: the base output plus each adapted part's x @ A^T @ B^T."""
    out = base_out.double().clone()
    col = 0
    for part, size in enumerate(sizes):
        pair = pairs[part] if pairs is not None else None
        if pair is not None:
            a, b = pair
            out[col : col + size] += (x.double() @ a.double().t()) @ b.double().t()
        col += size
    return out


def set_step(batch: LoraBatch, token_slots: list[int | None], dtype: torch.dtype) -> None:
    """The runner's mask: [T, S], 1 at each token's slot."""
    ids = torch.tensor([MAX_LORAS if slot is None else slot for slot in token_slots])
    batch.set_step((ids.unsqueeze(1) == torch.arange(MAX_LORAS)).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusable", [True, False])
@pytest.mark.parametrize(("sizes", "bias"), [([12], False), ([10, 6], False), ([8, 4, 4], True)])
@pytest.mark.parametrize("all_slots", [True, False])
def test_each_token_gets_its_own_adapter(
    sizes: list[int], bias: bool, fusable: bool, dtype: torch.dtype, all_slots: bool
) -> None:
    layer, batch = build(sizes, bias=bias, fusable=fusable, dtype=dtype)
    assert layer.fused == fusable
    adapters = {slot: adapter(sizes, rank=MAX_RANK - slot, seed=slot) for slot in range(MAX_LORAS)}
    for slot, pairs in adapters.items():
        layer.set_slot(slot, pairs)
    # All three slots in use, or only slots 0-1 (slot 2's weights are loaded but no token uses them).
    token_slots: list[int | None] = [0, None, 2, 1, 0, 2] if all_slots else [1, None, 0, 1]
    x = torch.randn(len(token_slots), IN).to(dtype)
    with torch.no_grad():
        batch.set_step(None)
        base_out = layer(x)
        set_step(batch, token_slots, layer.lora_b.dtype)  # float32 for float16 on CPU (expand_dtype)
        got = layer(x)
    atol = 1e-4 if dtype == torch.float32 else 0.1
    for t, token_slot in enumerate(token_slots):
        token_pairs = adapters[token_slot] if token_slot is not None else None
        torch.testing.assert_close(
            got[t].double(), expected(x[t], base_out[t], sizes, token_pairs), atol=atol, rtol=0.02
        )
    # A token without an adapter keeps the base output exactly (its h columns are masked to zero).
    assert torch.equal(got[1], base_out[1])


def test_a_rewritten_slot_is_used_at_the_next_step() -> None:
    """set_slot between steps: a slot refilled serves the new adapter at once, and an emptied one none."""
    sizes = [10, 6]
    layer, batch = build(sizes, bias=False, fusable=True, dtype=torch.float32)
    for slot in range(MAX_LORAS):
        layer.set_slot(slot, adapter(sizes, MAX_RANK, seed=slot))
    x = torch.randn(MAX_LORAS, IN)
    with torch.no_grad():
        batch.set_step(None)
        base_out = layer(x)
        set_step(batch, [0, 1, 2], torch.float32)
        layer(x)
        replacement = adapter(sizes, 2, seed=7)
        layer.set_slot(1, replacement)
        got = layer(x)
    torch.testing.assert_close(
        got[1].double(), expected(x[1], base_out[1], sizes, replacement), atol=1e-4, rtol=0
    )
    layer.set_slot(1, None)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[1], base_out[1], atol=1e-5, rtol=0)


def test_the_base_layer_shares_the_stacked_weight_and_runs_alone_without_adapters() -> None:
    linear = nn.Linear(IN, 12, bias=True)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    batch = LoraBatch(MAX_LORAS, MAX_RANK)
    layer = LoraLinear(linear, TargetModule(IN, (12,)), batch, linear.weight)
    # No second copy of the base weight: the base layer reads the first rows of [W; A].
    assert linear.weight.data_ptr() == layer.stacked.data_ptr()
    assert torch.equal(linear.weight, weight) and torch.equal(linear.bias, bias)
    layer.set_slot(0, [(torch.randn(MAX_RANK, IN), torch.randn(12, MAX_RANK))])
    x = torch.randn(5, IN)
    with torch.no_grad():
        assert torch.equal(layer(x), nn.functional.linear(x, weight, bias))  # no token uses an adapter
