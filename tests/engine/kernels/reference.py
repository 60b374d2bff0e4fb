"""Naive float64 torch references for the Triton kernels, written for clarity, not speed."""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.double()


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    summed = x.double() + residual.double()
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: Tensor) -> Tensor:
    x = x.double()
    gate, up = x.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def rotary_embedding(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor, is_neox: bool
) -> tuple[Tensor, Tensor]:
    rot_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache.double()[positions].chunk(2, dim=-1)  # [T, rot_dim / 2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: Tensor) -> Tensor:
        x = x.double().clone()
        rot = x[..., :rot_dim]
        if is_neox:
            first, second = rot[..., : rot_dim // 2], rot[..., rot_dim // 2 :]
        else:
            first, second = rot[..., 0::2], rot[..., 1::2]
        new_first = first * cos - second * sin
        new_second = second * cos + first * sin
        if is_neox:
            x[..., :rot_dim] = torch.cat([new_first, new_second], dim=-1)
        else:
            x[..., :rot_dim] = torch.stack([new_first, new_second], dim=-1).flatten(-2)
        return x

    return rotate(q), rotate(k)


def write_kv_cache(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> Tensor:
    """Returns a copy of kv_cache with k, v written at slot_mapping."""
    out = kv_cache.clone()
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = out.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    for token, slot in enumerate(slot_mapping.tolist()):
        flat[0, slot] = k[token].to(out.dtype)
        flat[1, slot] = v[token].to(out.dtype)
    return out


def paged_attention(
    q: Tensor,
    kv_cache: Tensor,
    block_table: Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    scale: float,
) -> Tensor:
    """Per sequence: gather its context from the cache, causal attention of its last q_len positions."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        positions = torch.arange(seq_len)
        slots = block_table[i, positions // block_size].long() * block_size + positions % block_size
        k = kv_cache[0].flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = kv_cache[1].flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,shd->hqs", q[start:end].double(), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len)
        scores = scores.masked_fill(positions[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqs,shd->qhd", scores.softmax(dim=-1), v)
    return out


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
