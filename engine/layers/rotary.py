"""Rotary position embedding: builds the cos/sin table once, rotates q and k per step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from engine.kernels import dispatch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _llama3_inv_freq(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    original_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # ramp = 0 at wavelen = original_len / low_freq_factor, 1 at original_len / high_freq_factor
    ramp = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - ramp) * inv_freq / factor + ramp * inv_freq
    scaled = torch.where(wavelen > original_len / low_freq_factor, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= original_len / low_freq_factor) & (wavelen >= original_len / high_freq_factor)
    return torch.where(is_medium, blended, scaled)


def _freq_factors(values: Any, rot_dim: int) -> Tensor:
    """GGUF's rope_freqs: one divisor per frequency (llama.cpp divides each rotation angle by it)."""
    factors = torch.tensor(values, dtype=torch.float32)
    if factors.shape != (rot_dim // 2,):
        raise ValueError(
            f"rope freq_factors must hold {rot_dim // 2} values, got shape {tuple(factors.shape)}"
        )
    return factors


def build_cos_sin_cache(
    rot_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None
) -> Tensor:
    """[max_position, rot_dim] float32 = cat(cos, sin), each over the rot_dim / 2 frequencies."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rope_type != "default":
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    if "freq_factors" in scaling:
        inv_freq = inv_freq / _freq_factors(scaling["freq_factors"], rot_dim)
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [max_position, rot_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        is_neox: bool = True,
        rot_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.is_neox = is_neox
        cache = build_cos_sin_cache(rot_dim or head_dim, max_position, base, rope_scaling)
        # Not persistent: it is derived from the config, never loaded from a checkpoint.
        self.cos_sin_cache: Tensor
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T]; q [T, Hq, D], k [T, Hkv, D] -> rotated (q, k)."""
        return dispatch.rotary_embedding(positions, q, k, self.cos_sin_cache, self.is_neox)
