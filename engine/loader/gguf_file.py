"""Reads a GGUF file: its metadata as plain Python values, the model's shape, and its tensors dequantized
under HF names."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.models.config import ModelArchConfig

# GGUF tensor name (after `blk.N.`) -> Hugging Face name (after `model.layers.N.`)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Per-frequency rotary divisors (how llama.cpp's converter stores Llama 3.1's rope scaling): part of the
# model's shape, folded into the rotary table, not a weight.
ROPE_FREQS = "rope_freqs.weight"


def open_gguf(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    return metadata


def hf_tensor_name(gguf_name: str) -> str:
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part not in _LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} is not supported")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base not in _GLOBAL_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not supported")
    return f"{_GLOBAL_NAMES[base]}.{kind}"


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (interleaved rotary pairs) so half-rotation (neox) rotary applies."""
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    # llama.cpp stores row (h, i, j) of a [heads, head_dim / 2, 2] view at original (h, j, i).
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(reader: Any, metadata: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, float32 tensor), dequantizing one tensor at a time."""
    arch = metadata["general.architecture"]
    # Only llama-arch files are converted with permuted Q/K; Qwen files keep HF order.
    permuted = arch == "llama"
    num_heads = int(metadata[f"{arch}.attention.head_count"])
    num_kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv") or num_heads)
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue  # read by gguf_arch_config
        name = hf_tensor_name(tensor.name)
        weight = _dequantized(tensor)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_rotary_rows(weight, num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_rotary_rows(weight, num_kv_heads)
        yield name, weight


def _dequantized(tensor: Any) -> torch.Tensor:
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
    values = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not values.flags.writeable:  # unquantized tensors come back as read-only views of the mmap
        values = values.copy()
    return torch.from_numpy(values).reshape(shape)


def has_tensor(reader: Any, gguf_name: str) -> bool:
    return any(t.name == gguf_name for t in reader.tensors)


def gguf_arch_config(reader: Any, metadata: dict[str, Any]) -> ModelArchConfig:
    """The model's shape from the metadata, with rope_freqs (if the file has it) as rotary `freq_factors`."""
    arch = ModelArchConfig.from_gguf_metadata(metadata, has_output_weight=has_tensor(reader, "output.weight"))
    rope_freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if rope_freqs is None:
        return arch
    freq_factors = tuple(float(f) for f in _dequantized(rope_freqs).flatten().tolist())
    scaling = {**(arch.rope_scaling or {"rope_type": "default"}), "freq_factors": freq_factors}
    return dataclasses.replace(arch, rope_scaling=scaling)
