"""GGUF weights kept in their quantized blocks for few-row CPU steps (engine/kernels/cpu_quant.c).

A decode step of a few sequences reads every weight once. The dense copy the model loads (float16 or
float32, dequantized from the file) is 2-4x the bytes of the file's 4-bit blocks, so each linear layer
of a GGUF model on CPU also keeps its blocks, and steps of at most MAX_PACKED_ROWS rows multiply with them
(float32 arithmetic on the exact dequantized values); bigger steps (prefill, many streams) keep the dense
matmuls, which win from about 32 rows (benchmarks/RESULTS.md). Applied to a built, loaded model from
outside: the model files know nothing of it.

Supported block types: Q4_0, Q4_1 (as "u4": 4-bit values with a scale and an offset per block) and
Q8_0 ("i8"). Layers stored in other types keep their dense path only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engine.kernels import cpu_quant
from engine.loader.gguf_file import hf_tensor_name, unpermute_rotary_rows

logger = logging.getLogger(__name__)

# Rows up to which the block kernels beat the dense matmuls on the Zen 4 VM: all 30 layers of the default
# model took 2-3x less time at 2-8 rows, 1.3-1.5x at 16, about the same at 32 (benchmarks/RESULTS.md).
MAX_PACKED_ROWS = 32

_U4_TYPES = ("Q4_0", "Q4_1")
_I8_TYPES = ("Q8_0",)


@dataclasses.dataclass
class PackedWeight:
    """One [N, K] weight as blocks of 32: q [N, K / 2] uint8 nibbles ("u4") or [N, K] int8 ("i8"),
    scales [N, K / 32] float32, offsets [N, K / 32] float32 for "u4" (None for "i8"). Steps of at most
    max_rows rows use it."""

    q: Tensor
    scales: Tensor
    offsets: Tensor | None
    max_rows: int = MAX_PACKED_ROWS

    @property
    def kind(self) -> str:
        """ "u4" (4-bit values, a scale and an offset per block) or "i8" (int8 values, a scale per block)."""
        return "i8" if self.offsets is None else "u4"

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.scales.shape[1] * cpu_quant.BLOCK

    def rows(self, order: Tensor) -> PackedWeight:
        """The same weight with its output rows permuted (index tensor `order`)."""
        offsets = None if self.offsets is None else self.offsets[order]
        return PackedWeight(self.q[order], self.scales[order], offsets, self.max_rows)

    @staticmethod
    def cat(parts: list[PackedWeight], max_rows: int = MAX_PACKED_ROWS) -> PackedWeight:
        """Stacks output rows, as merged projections (q/k/v, gate/up) stack their parts."""
        offsets = [p.offsets for p in parts if p.offsets is not None]
        return PackedWeight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat(offsets) if len(offsets) == len(parts) else None,
            max_rows,
        )

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x [T, K] in the model's dtype -> x @ W^T + bias [T, N] in x's dtype."""
        b32 = None if bias is None else bias.float().contiguous()
        return self.logits(x, b32).to(x.dtype)

    def logits(self, hidden: Tensor, bias: Tensor | None = None) -> Tensor:
        """hidden [T, K] -> float32 [T, N] (for an LM head: no cast back); bias float32 or None."""
        x32 = hidden.float().contiguous()
        if self.offsets is not None:
            return cpu_quant.u4_matmul(x32, self.q, self.scales, self.offsets, bias)
        return cpu_quant.i8_matmul(x32, self.q, self.scales, bias)


def pack_gguf_tensor(tensor: Any) -> PackedWeight | None:
    """A GGUFReader tensor's blocks repacked for the kernels; None for types they do not take."""
    kind = tensor.tensor_type.name
    if kind not in _U4_TYPES + _I8_TYPES or len(tensor.shape) != 2:
        return None
    n, k = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists dims fastest-first
    if k % cpu_quant.BLOCK:
        return None
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // cpu_quant.BLOCK, -1)
    scales = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        signed = raw[..., 2:34].copy().view(np.int8).reshape(n, k)
        return PackedWeight(torch.from_numpy(signed), torch.from_numpy(scales), None)
    if kind == "Q4_1":
        offsets = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = raw[..., 4:20]
    else:  # Q4_0: d * (q - 8)
        offsets = -8.0 * scales
        nibbles = raw[..., 2:18]
    q = np.ascontiguousarray(nibbles).reshape(n, k // 2)
    return PackedWeight(torch.from_numpy(q), torch.from_numpy(scales), torch.from_numpy(offsets))


def _rotary_order(num_rows: int, num_heads: int) -> Tensor:
    """Row indices that undo llama.cpp's Q/K row permutation (as gguf_file.unpermute_rotary_rows)."""
    return unpermute_rotary_rows(torch.arange(num_rows), num_heads)


def attach_packed_weights(model: nn.Module, reader: Any, metadata: dict[str, Any]) -> int:
    """Gives every linear layer (and the LM head) whose GGUF tensors all have a supported block type a
    `packed_weight`; returns how many got one. Needs the kernels built (cpu_quant.library())."""
    from engine.models.llama import STACKED_PARAMS

    arch = metadata["general.architecture"]
    permuted = arch == "llama"  # as gguf_file.iter_gguf_weights
    num_heads = int(metadata[f"{arch}.attention.head_count"])
    num_kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv") or num_heads)
    tied = bool(getattr(getattr(model, "arch", None), "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    parts: dict[str, dict[int, PackedWeight]] = {}
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
        packed = PackedWeight.cat([pieces[i] for i in range(expected)])
        if packed.shape != tuple(weight.shape):
            raise ValueError(f"{path}: GGUF blocks give {packed.shape}, the layer is {tuple(weight.shape)}")
        module.packed_weight = packed
        attached += 1
    return attached
