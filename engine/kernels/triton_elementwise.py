"""Triton kernels for the per-token ops of a decoder layer: RMSNorm, rotary embedding, SiLU-and-mul, KV-cache write.

Every kernel loads in the tensor's dtype and converts to float32 at once (fast on GPU, and required by the
Triton interpreter, whose bf16 arithmetic is wrong); results are cast back on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _num_warps(block: int) -> int:
    # One warp per 256 elements of a row, between 1 and 16.
    return max(1, min(16, block // 256))


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(
            residual_out_ptr + row * stride_residual_out + cols,
            x.to(residual_out_ptr.dtype.element_ty),
            mask=mask,
        )
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden_size + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols, (x * inv_rms * weight).to(out_ptr.dtype.element_ty), mask=mask
    )


def _launch_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    num_tokens, hidden_size = x.shape
    out = torch.empty((num_tokens, hidden_size), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else out
    block_h = triton.next_power_of_2(hidden_size)
    if num_tokens > 0:
        _rms_norm_kernel[(num_tokens,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            residual_out,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            out.stride(0),
            residual_out.stride(0),
            hidden_size,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_H=block_h,
            num_warps=_num_warps(block_h),
        )
    return out, residual_out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [T, H] -> x / rms(x) * weight, computed in float32, returned in x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _launch_rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Returns (rms_norm(x + residual), x + residual) from one pass over x and residual."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual.stride(-1) != 1:
        residual = residual.contiguous()
    return _launch_rms_norm(x, residual, weight, eps)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, intermediate_size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate_size + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2*I] -> [T, I] = silu(x[:, :I]) * x[:, I:]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tokens, intermediate_size = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, intermediate_size), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(intermediate_size))
    if num_tokens > 0:
        grid = (num_tokens, triton.cdiv(intermediate_size, block))
        _silu_and_mul_kernel[grid](
            x, out, x.stride(0), out.stride(0), intermediate_size, BLOCK=block, num_warps=_num_warps(block)
        )
    return out


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    src_stride_t,
    src_stride_h,
    dst_stride_t,
    dst_stride_h,
    token,
    num_heads,
    head_size,
    cos,
    sin,
    partner,
    is_rotated,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Each output dim d is x[d] * cos - x[partner] * sin (first of a pair) or x[d] * cos + x[partner] * sin
    # (second of a pair); the sign is already folded into `sin`. Dims past rot_dim are copied as they are.
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < head_size)
    base = src_ptr + token * src_stride_t + heads[:, None] * src_stride_h
    x = tl.load(base + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(base + partner[None, :], mask=mask & is_rotated[None, :], other=0.0).to(tl.float32)
    out = tl.where(is_rotated[None, :], x * cos[None, :] + x_partner * sin[None, :], x)
    dst = dst_ptr + token * dst_stride_t + heads[:, None] * dst_stride_h + dims[None, :]
    tl.store(dst, out.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_sin_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    q_out_stride_t,
    q_out_stride_h,
    k_out_stride_t,
    k_out_stride_h,
    cos_sin_stride,
    num_q_heads,
    num_kv_heads,
    head_size,
    rot_dim,
    IS_NEOX: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    half = rot_dim // 2
    dims = tl.arange(0, BLOCK_D)
    is_rotated = dims < rot_dim
    if IS_NEOX:
        # Half rotation: dim d pairs with d + half (first half) or d - half (second half).
        freq = dims % half
        is_first = dims < half
        partner = tl.where(is_first, dims + half, dims - half)
    else:
        # GPT-J style: interleaved pairs (2i, 2i + 1).
        freq = dims // 2
        is_first = (dims % 2) == 0
        partner = tl.where(is_first, dims + 1, dims - 1)
    cache_row = cos_sin_ptr + position * cos_sin_stride
    cos = tl.load(cache_row + freq, mask=is_rotated, other=1.0).to(tl.float32)
    sin = tl.load(cache_row + half + freq, mask=is_rotated, other=0.0).to(tl.float32)
    sin = tl.where(is_first, -sin, sin)
    _rotate_heads(
        q_ptr, q_out_ptr, q_stride_t, q_stride_h, q_out_stride_t, q_out_stride_h, token, num_q_heads,
        head_size, cos, sin, partner, is_rotated, BLOCK_Q_HEADS, BLOCK_D,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, k_out_ptr, k_stride_t, k_stride_h, k_out_stride_t, k_out_stride_h, token, num_kv_heads,
        head_size, cos, sin, partner, is_rotated, BLOCK_KV_HEADS, BLOCK_D,
    )  # fmt: skip


def rotary_embedding(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor, is_neox: bool
) -> tuple[Tensor, Tensor]:
    """Rotates the first rot_dim dims of every head of q [T, Hq, D] and k [T, Hkv, D]; returns new tensors.

    cos_sin_cache [max_pos, rot_dim] holds cat(cos, sin) per position (any frequency scaling already folded in).
    """
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    num_tokens, num_q_heads, head_size = q.shape
    num_kv_heads = k.shape[1]
    rot_dim = cos_sin_cache.shape[1]
    q_out = torch.empty((num_tokens, num_q_heads, head_size), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_kv_heads, head_size), dtype=k.dtype, device=k.device)
    if num_tokens > 0:
        block_d = triton.next_power_of_2(head_size)
        block_q_heads = triton.next_power_of_2(num_q_heads)
        _rotary_kernel[(num_tokens,)](
            positions, q, k, q_out, k_out, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin_cache.stride(0), num_q_heads, num_kv_heads, head_size, rot_dim,
            IS_NEOX=is_neox,
            BLOCK_Q_HEADS=block_q_heads,
            BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
            BLOCK_D=block_d,
            num_warps=_num_warps(block_q_heads * block_d),
        )  # fmt: skip
    return q_out, k_out


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_mapping_ptr,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    cache_stride_kv,
    cache_stride_block,
    cache_stride_slot,
    cache_stride_h,
    num_kv_heads,
    head_size,
    block_size,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # Padding tokens of a captured CUDA graph carry a negative slot and write nothing.
    if slot >= 0:
        heads = tl.arange(0, BLOCK_HEADS)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_size)
        k = tl.load(k_ptr + token * k_stride_t + heads[:, None] * k_stride_h + dims[None, :], mask=mask)
        v = tl.load(v_ptr + token * v_stride_t + heads[:, None] * v_stride_h + dims[None, :], mask=mask)
        dst = (
            cache_ptr
            + (slot // block_size) * cache_stride_block
            + (slot % block_size) * cache_stride_slot
            + heads[:, None] * cache_stride_h
            + dims[None, :]
        )
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + cache_stride_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatters k, v [T, Hkv, D] into kv_cache [2, num_blocks, block_size, Hkv, D] at slot_mapping [T]."""
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    num_tokens, num_kv_heads, head_size = k.shape
    if num_tokens == 0:
        return
    block_heads = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_size)
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_kv_heads, head_size, kv_cache.shape[2],
        BLOCK_HEADS=block_heads,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_heads * block_d),
    )  # fmt: skip
