"""GGUF weights kept in their quantized blocks for CPU steps (engine/kernels/cpu_quant.c).

A decode step of a few sequences reads every weight once. The dense copy the model loads (float16 or
float32, dequantized from the file) is 2-4x the bytes of the file's 4-bit blocks, so each linear layer
of a GGUF model on CPU also keeps its blocks and multiplies with them: exact integer dot products of the
weights' blocks with activations rounded to about 15 bits per block of 32 (cpu_quant.c says how, and why
that keeps float32's top-1 agreement). With AVX-512 VNNI that beats the dense float32 matmul at every row
count measured (all 120 layers of the default model at 1-512 rows: 1.5-5.8x), so every step uses it; with AVX2 only, steps of more than
AVX2_MAX_ROWS rows (prefill, many streams) keep the dense matmul (benchmarks/RESULTS.md). Applied to a
built, loaded model from outside: the model files know nothing of it.

Supported block types: Q4_0, Q4_1 (as "u4": 4-bit values with a scale and an offset per block) and
Q8_0 ("i8"). Layers stored in other types keep their dense path only.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import sys
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engine.kernels import cpu_quant
from engine.loader.gguf_file import hf_tensor_name, unpermute_rotary_rows

logger = logging.getLogger(__name__)

# Rows up to which the AVX2 build (no VNNI) beats the dense float32 matmul: all 30 layers of the default
# model on the Zen 4 VM built for AVX2: 1.8-3.2x faster at 1-16 rows, 1.4x at 32, 4% slower at 64, 6% at
# 512 (benchmarks/RESULTS.md).
AVX2_MAX_ROWS = 32
# Rows up to which the exact float32 kernel (cpu_exact.c, an explicit --dtype) beats the dense matmuls on
# the Zen 4 VM: 2-3x less time at 2-8 rows, 1.3-1.5x at 16, about the same at 32 (session 7).
EXACT_MAX_ROWS = 32
GROUP = 16  # output rows per group of the kernel's layout (cpu_quant.c)

_U4_TYPES = ("Q4_0", "Q4_1")
_I8_TYPES = ("Q8_0",)


@dataclasses.dataclass
class BlockRows:
    """One [N, K] weight's GGUF blocks of 32, row by row as the file stores them: q [N, K / 2] uint8
    nibbles ("u4": byte j holds weight j low and j + 16 high) or [N, K] int8 ("i8"); scales [N, K / 32]
    float16, and offsets [N, K / 32] float16 for "u4" (None for "i8"). What the loader permutes and
    concatenates before `pack` lays it out for the kernel."""

    q: Tensor
    scales: Tensor
    offsets: Tensor | None

    @property
    def kind(self) -> str:
        """ "u4" (4-bit values, a scale and an offset per block) or "i8" (int8 values, a scale per block)."""
        return "i8" if self.offsets is None else "u4"

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.scales.shape[1] * cpu_quant.BLOCK

    def rows(self, order: Tensor) -> BlockRows:
        """The same weight with its output rows permuted (index tensor `order`)."""
        offsets = None if self.offsets is None else self.offsets[order]
        return BlockRows(self.q[order], self.scales[order], offsets)

    @staticmethod
    def cat(parts: list[BlockRows]) -> BlockRows:
        """Stacks output rows, as merged projections (q/k/v, gate/up) stack their parts."""
        offsets = [p.offsets for p in parts if p.offsets is not None]
        return BlockRows(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat(offsets) if len(offsets) == len(parts) else None,
        )

    def pack_exact(self) -> ExactPackedWeight:
        """The exact kernel's form (cpu_exact.c): the same rows, float32 scales and offsets."""
        offsets = None if self.offsets is None else self.offsets.float()
        return ExactPackedWeight(self.q, self.scales.float(), offsets)

    def pack(self, max_rows: int | None = None) -> PackedWeight:
        """The kernel's layout (cpu_quant.c, "g16"): rows in groups of GROUP, each block's quads of 4
        weights of the group's rows side by side."""
        n, k = self.shape
        nb, groups = k // cpu_quant.BLOCK, -(-n // GROUP)
        pad = groups * GROUP - n
        if self.offsets is not None:  # values 0-15 in weight order, then quad j low, quad j + 4 high
            values = _u4_values(self.q, nb)
            values = torch.nn.functional.pad(values, (0, 0, 0, pad)).view(groups, GROUP, nb, 8, 4)
            q = values[:, :, :, :4] | (values[:, :, :, 4:] << 4)  # [groups, 16, nb, 4, 4]
        else:
            q = torch.nn.functional.pad(self.q.view(torch.uint8), (0, 0, 0, pad)).view(
                groups, GROUP, nb, 8, 4
            )
        q = q.permute(0, 2, 3, 1, 4).contiguous()  # [groups, nb, quads, 16 rows, 4]

        def grouped(per_block: Tensor) -> Tensor:  # [N, nb] -> [groups, nb, 16] float16, as the kernel reads
            padded = torch.nn.functional.pad(per_block.half(), (0, 0, 0, pad))
            return padded.view(groups, GROUP, nb).transpose(1, 2).contiguous()

        offsets = None if self.offsets is None else grouped(self.offsets)
        return PackedWeight(
            q, grouped(self.scales), offsets, (n, k), default_max_rows() if max_rows is None else max_rows
        )


class _Products(abc.ABC):
    """`linear` for both kernel forms, through their `logits`."""

    @abc.abstractmethod
    def logits(self, hidden: Tensor, bias: Tensor | None = None) -> Tensor:
        """hidden [T, K] -> float32 [T, N] (for an LM head: no cast back); bias float32 or None."""

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x [T, K] in the model's dtype -> x @ W^T + bias [T, N] in x's dtype."""
        b32 = None if bias is None else bias.float().contiguous()
        return self.logits(x, b32).to(x.dtype)


@dataclasses.dataclass
class ExactPackedWeight(BlockRows, _Products):
    """A weight's blocks for the exact kernel (cpu_exact.c), what an explicit --dtype gets: the rows as
    BlockRows holds them, scales (and offsets for "u4") float32. float32 arithmetic on the dequantized
    weights, so a product equals the dense one up to summation order; it beats the dense matmul up to
    EXACT_MAX_ROWS rows, and bigger steps keep the dense weights."""

    max_rows: int = EXACT_MAX_ROWS

    def logits(self, hidden: Tensor, bias: Tensor | None = None) -> Tensor:
        """hidden [T, K] -> float32 [T, N] (for an LM head: no cast back); bias float32 or None."""
        x32 = hidden.float().contiguous()
        if self.offsets is not None:
            return cpu_quant.u4_matmul_exact(x32, self.q, self.scales, self.offsets, bias)
        return cpu_quant.i8_matmul_exact(x32, self.q, self.scales, bias)


def default_max_rows() -> int:
    """Steps of up to this many rows use the blocks: all with VNNI, AVX2_MAX_ROWS without."""
    return sys.maxsize if cpu_quant.has_vnni() else AVX2_MAX_ROWS


def _u4_values(q: Tensor, nb: int) -> Tensor:
    """[N, K / 2] GGUF nibbles -> [N, K] uint8 values 0-15 in weight order."""
    blocks = q.view(q.shape[0], nb, cpu_quant.BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).view(q.shape[0], nb * cpu_quant.BLOCK)


@dataclasses.dataclass
class PackedWeight(_Products):
    """A weight's blocks in the kernel's layout (BlockRows.pack): q uint8 and scales (and offsets for "u4")
    float16 per group of 16 output rows. Steps of at most max_rows rows use it."""

    q: Tensor
    scales: Tensor
    offsets: Tensor | None
    shape: tuple[int, int]
    max_rows: int

    @property
    def kind(self) -> str:
        return "i8" if self.offsets is None else "u4"

    def logits(self, hidden: Tensor, bias: Tensor | None = None) -> Tensor:
        """hidden [T, K] -> float32 [T, N] (for an LM head: no cast back); bias float32 or None."""
        x32 = hidden.float().contiguous()
        return cpu_quant.block_matmul(x32, self.q, self.scales, self.offsets, self.shape[0], bias)


def pack_gguf_tensor(tensor: Any) -> BlockRows | None:
    """A GGUFReader tensor's blocks, row by row; None for types the kernels do not take."""
    kind = tensor.tensor_type.name
    if kind not in _U4_TYPES + _I8_TYPES or len(tensor.shape) != 2:
        return None
    n, k = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists dims fastest-first
    if k % cpu_quant.BLOCK:
        return None
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // cpu_quant.BLOCK, -1)
    scales = raw[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        signed = raw[..., 2:34].copy().view(np.int8).reshape(n, k)
        return BlockRows(torch.from_numpy(signed), torch.from_numpy(scales), None)
    if kind == "Q4_1":
        offsets = raw[..., 2:4].copy().view(np.float16)[..., 0]
        nibbles = raw[..., 4:20]
    else:  # Q4_0: d * (q - 8), so m = -8 d: exact in float16 unless it overflows
        if np.abs(scales.astype(np.float32)).max(initial=0.0) * 8 > np.finfo(np.float16).max:
            return None
        offsets = (-8.0 * scales.astype(np.float32)).astype(np.float16)
        nibbles = raw[..., 2:18]
    q = np.ascontiguousarray(nibbles).reshape(n, k // 2)
    return BlockRows(torch.from_numpy(q), torch.from_numpy(scales), torch.from_numpy(offsets))


def _rotary_order(num_rows: int, num_heads: int) -> Tensor:
    """Row indices that undo llama.cpp's Q/K row permutation (as gguf_file.unpermute_rotary_rows)."""
    return unpermute_rotary_rows(torch.arange(num_rows), num_heads)


def attach_packed_weights(
    model: nn.Module, reader: Any, metadata: dict[str, Any], exact: bool = False
) -> int:
    """Gives every linear layer (and the LM head) whose GGUF tensors all have a supported block type a
    `packed_weight`: the integer kernel's (PackedWeight), or with `exact` the float32 one's
    (ExactPackedWeight); returns how many got one. Needs the kernels built (cpu_quant.library())."""
    from engine.models.llama import STACKED_PARAMS

    arch = metadata["general.architecture"]
    permuted = arch == "llama"  # as gguf_file.iter_gguf_weights
    num_heads = int(metadata[f"{arch}.attention.head_count"])
    num_kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv") or num_heads)
    tied = bool(getattr(getattr(model, "arch", None), "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    parts: dict[str, dict[int, BlockRows]] = {}
    for tensor in reader.tensors:
        if not tensor.name.endswith(".weight") or tensor.tensor_type.name not in _U4_TYPES + _I8_TYPES:
            continue  # norms, rope_freqs, F16/F32 and K-quant tensors: nothing to pack
        name = hf_tensor_name(tensor.name)
        module_path = name.removesuffix(".weight")
        if module_path == "model.embed_tokens":
            if not tied:
                continue
            module_path = "lm_head"
        packed = pack_gguf_tensor(tensor)
        if packed is None:
            continue
        parent, _, proj = module_path.rpartition(".")
        if permuted and proj in ("q_proj", "k_proj"):
            heads = num_heads if proj == "q_proj" else num_kv_heads
            packed = packed.rows(_rotary_order(packed.shape[0], heads))
        if proj in STACKED_PARAMS:
            merged, index = STACKED_PARAMS[proj]
            parts.setdefault(f"{parent}.{merged}", {})[index] = packed
        else:
            parts.setdefault(module_path, {})[0] = packed
    attached = 0
    for path, pieces in parts.items():
        module = modules.get(path)
        weight = getattr(module, "weight", None)
        if module is None or not hasattr(module, "packed_weight") or not isinstance(weight, Tensor):
            continue
        expected = len(getattr(module, "output_sizes", [0]))
        kinds = {p.kind for p in pieces.values()}
        if sorted(pieces) != list(range(expected)) or len(kinds) != 1:
            continue  # a merged layer whose parts are stored in different types: dense only
        merged_rows = BlockRows.cat([pieces[i] for i in range(expected)])
        if merged_rows.shape != tuple(weight.shape):
            raise ValueError(
                f"{path}: GGUF blocks give {merged_rows.shape}, the layer is {tuple(weight.shape)}"
            )
        module.packed_weight = merged_rows.pack_exact() if exact else merged_rows.pack()
        attached += 1
    return attached


def release_dense_weights(model: nn.Module) -> int:
    """Frees the dense weight of every linear layer whose blocks serve all row counts (VNNI builds), keeping
    an empty placeholder that fails loudly if anything still reads it; returns the bytes freed. Not for
    the LM head, whose weight is the (tied) embedding table, nor for models that LoRA adapts (their layers
    add to the dense weight). Serving the default model this way holds about 430 MB less."""
    from engine.layers.linear import Linear

    freed = 0
    for module in model.modules():
        packed = getattr(module, "packed_weight", None)
        if isinstance(module, Linear) and packed is not None and packed.max_rows == sys.maxsize:
            weight = module.weight
            freed += weight.numel() * weight.element_size()
            module.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
    return freed
