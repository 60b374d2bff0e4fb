"""Triton paged attention for a mixed prefill + decode batch, with a split-KV path for long decodes.

Main kernel: one program per (sequence, KV head, query tile). A program's rows are (query token, query head
of the KV head's GQA group) pairs, so each K/V tile is loaded once for the whole group and both products are
tl.dot. K/V tiles are BLOCK_N consecutive positions gathered through the block table. Softmax is online, in
float32, in base 2. Grid sizes come only from host ints, so a launch is CUDA-graph capturable.

Split-KV decode: when every query is a decode and there are too few (sequence, KV head) pairs to fill the GPU,
each program handles one KV partition and writes a partial (out, max, sum); a reduce kernel combines them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.attention import AttentionMetadata

LOG2_E = 1.4426950408889634
BLOCK_N = 64  # K/V positions per tile; a partition is a multiple of it
DEFAULT_PARTITION_SIZE = 512
# Below this many (sequence, KV head) programs, a decode-only batch with long contexts is split along the KV axis
# (an H100 has 132 SMs; a few programs per SM keep it busy).
SPLIT_KV_MAX_PROGRAMS = 256


@triton.jit
def _attend_kv_range(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row,
    dims,
    kv_lo,
    kv_hi,
    kv_head,
    stride_block,
    stride_slot,
    stride_head,
    head_size,
    qk_scale,
    KV_BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Folds K/V positions [kv_lo, kv_hi) into the running (acc, m_i, l_i). With CAUSAL, position p is masked
    # for rows with q_pos < p and past kv_hi; without it every position in range is visible to every row
    # (kv_hi - kv_lo must then be a multiple of BLOCK_N).
    offs_n = tl.arange(0, BLOCK_N)
    dim_mask = dims < head_size
    for start in range(kv_lo, kv_hi, BLOCK_N):
        kv_pos = start + offs_n
        in_range = kv_pos < kv_hi
        block_ids = tl.load(block_table_row + kv_pos // KV_BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        slot_off = block_ids * stride_block + (kv_pos % KV_BLOCK_SIZE) * stride_slot + kv_head * stride_head
        load_mask = in_range[None, :] & dim_mask[:, None]
        k_t = tl.load(k_cache_ptr + slot_off[None, :] + dims[:, None], mask=load_mask, other=0.0)  # [D, N]
        v = tl.load(
            v_cache_ptr + slot_off[:, None] + dims[None, :],
            mask=in_range[:, None] & dim_mask[None, :],
            other=0.0,
        )  # [N, D]
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [M, N], base-2 logits
        if CAUSAL:
            s = tl.where((kv_pos[None, :] <= q_pos[:, None]) & in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    kv_cache_ptr,
    out_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_table_ptr,
    stride_q_t,
    stride_q_h,
    stride_out_t,
    stride_out_h,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_block_table,
    head_size,
    qk_scale,
    KV_BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile_start = tl.program_id(2) * BLOCK_Q
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_start = seq_len - q_len  # position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    token = rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (token < BLOCK_Q) & (tile_start + token < q_len) & (rows % GROUP_PAD < GROUP)
    # Padding rows take the tile's first position so their softmax stays finite; they are never stored.
    q_pos = context_start + tile_start + tl.where(row_valid, token, 0)
    dims = tl.arange(0, BLOCK_D)
    q_offs = (q_begin + tile_start + token).to(tl.int64)[:, None] * stride_q_t + head[:, None] * stride_q_h
    q_mask = row_valid[:, None] & (dims[None, :] < head_size)
    q = tl.load(q_ptr + q_offs + dims[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_block_table
    k_cache_ptr = kv_cache_ptr
    v_cache_ptr = kv_cache_ptr + stride_cache_kv
    # Positions up to the tile's first query are visible to every row: no mask needed there.
    first_q_pos = context_start + tile_start
    full_end = (first_q_pos + 1) // BLOCK_N * BLOCK_N
    last_q_pos = context_start + tl.minimum(tile_start + BLOCK_Q, q_len) - 1
    acc, m_i, l_i = _attend_kv_range(
        acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_row, dims, 0, full_end, kv_head,
        stride_cache_block, stride_cache_slot, stride_cache_head, head_size, qk_scale, KV_BLOCK_SIZE,
        False, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    acc, m_i, l_i = _attend_kv_range(
        acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_row, dims, full_end, last_q_pos + 1,
        kv_head, stride_cache_block, stride_cache_slot, stride_cache_head, head_size, qk_scale, KV_BLOCK_SIZE,
        True, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    out = acc / l_i[:, None]
    out_rows = (q_begin + tile_start + token).to(tl.int64)
    out_offs = out_rows[:, None] * stride_out_t + head[:, None] * stride_out_h
    tl.store(out_ptr + out_offs + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _split_kv_decode_kernel(
    q_ptr,
    kv_cache_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    seq_lens_ptr,
    block_table_ptr,
    stride_q_t,
    stride_q_h,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_block_table,
    num_q_heads,
    num_partitions,
    head_size,
    qk_scale,
    KV_BLOCK_SIZE: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Every sequence has exactly one query token (token index = sequence index).
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_lo = partition * PARTITION_SIZE
    if kv_lo >= seq_len:
        return  # the reduce kernel only reads this sequence's first cdiv(seq_len, PARTITION_SIZE) partitions
    kv_hi = tl.minimum(kv_lo + PARTITION_SIZE, seq_len)

    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    q_mask = row_valid[:, None] & (dims[None, :] < head_size)
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_q_t + head[:, None] * stride_q_h + dims[None, :],
        mask=q_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_block_table
    full_end = kv_lo + (kv_hi - kv_lo) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_kv_range(
        acc, m_i, l_i, q, q_pos, kv_cache_ptr, kv_cache_ptr + stride_cache_kv, block_table_row, dims, kv_lo,
        full_end, kv_head, stride_cache_block, stride_cache_slot, stride_cache_head, head_size, qk_scale,
        KV_BLOCK_SIZE, False, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    acc, m_i, l_i = _attend_kv_range(
        acc, m_i, l_i, q, q_pos, kv_cache_ptr, kv_cache_ptr + stride_cache_kv, block_table_row, dims, full_end,
        kv_hi, kv_head, stride_cache_block, stride_cache_slot, stride_cache_head, head_size, qk_scale,
        KV_BLOCK_SIZE, True, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    # Partial buffers are [num_seqs, num_q_heads, num_partitions(, BLOCK_D)], float32.
    stat_offs = (seq * num_q_heads + head).to(tl.int64) * num_partitions + partition
    tl.store(partial_max_ptr + stat_offs, m_i, mask=row_valid)
    tl.store(partial_sum_ptr + stat_offs, l_i, mask=row_valid)
    out = acc / l_i[:, None]
    tl.store(partial_out_ptr + stat_offs[:, None] * BLOCK_D + dims[None, :], out, mask=row_valid[:, None])


@triton.jit
def _split_kv_reduce_kernel(
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    out_ptr,
    seq_lens_ptr,
    stride_out_t,
    stride_out_h,
    num_q_heads,
    num_partitions,
    head_size,
    PARTITION_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    parts = tl.arange(0, BLOCK_P)
    part_valid = parts < tl.cdiv(seq_len, PARTITION_SIZE)
    stat_offs = (seq * num_q_heads + head).to(tl.int64) * num_partitions + parts
    part_max = tl.load(partial_max_ptr + stat_offs, mask=part_valid, other=float("-inf"))
    part_sum = tl.load(partial_sum_ptr + stat_offs, mask=part_valid, other=0.0)
    weight = part_sum * tl.exp2(part_max - tl.max(part_max, axis=0))  # 0 for unused partitions
    dims = tl.arange(0, BLOCK_D)
    part_out = tl.load(
        partial_out_ptr + stat_offs[:, None] * BLOCK_D + dims[None, :], mask=part_valid[:, None], other=0.0
    )
    out = tl.sum(part_out * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    out_offs = seq.to(tl.int64) * stride_out_t + head * stride_out_h + dims
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=dims < head_size)


def _runs_on_gpu(tensor: Tensor) -> bool:
    # A function of its own so the ahead-of-time compile check (no GPU) can pick the GPU settings.
    return tensor.device.type == "cuda"


def _dot_settings(q: Tensor) -> tuple[bool, str]:
    # The interpreter (CPU tensors) computes bf16 wrongly, so it upcasts after every load; on GPU bf16/fp16 go
    # to the tensor cores as they are, and float32 uses exact fp32 products rather than tf32.
    upcast = not _runs_on_gpu(q)
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    return upcast, precision


def should_split_kv(meta: AttentionMetadata, num_kv_heads: int, partition_size: int) -> bool:
    """The split-KV heuristic: a decode-only batch whose few (sequence, KV head) pairs have long contexts."""
    return (
        meta.max_query_len == 1
        and meta.max_seq_len > 2 * partition_size
        and meta.num_seqs * num_kv_heads < SPLIT_KV_MAX_PROGRAMS
    )


def paged_attention(
    q: Tensor,
    kv_cache: Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    split_kv: bool | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
) -> Tensor:
    """Causal attention of q [T, Hq, D] over the paged cache kv_cache [2, num_blocks, block_size, Hkv, D].

    split_kv: None picks the path by should_split_kv(); True forces split-KV (only valid when every query is a
    decode); False forces the single-pass kernel. partition_size must be a multiple of BLOCK_N.
    """
    if q.stride(-1) != 1:
        q = q.contiguous()
    num_tokens, num_q_heads, head_size = q.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_q_heads // num_kv_heads
    out = torch.empty((num_tokens, num_q_heads, head_size), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if split_kv is None:
        split_kv = meta.split_kv
    if split_kv is None:
        split_kv = should_split_kv(meta, num_kv_heads, partition_size)
    upcast, precision = _dot_settings(q)
    block_d = max(16, triton.next_power_of_2(head_size))
    group_pad = triton.next_power_of_2(group)
    qk_scale = scale * LOG2_E
    cache_strides = (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3))
    if split_kv:
        if meta.max_query_len != 1 or partition_size % BLOCK_N != 0:
            raise ValueError(
                "split-KV attention needs a decode-only batch and a partition size multiple of 64"
            )
        _split_kv(q, kv_cache, meta, out, group, block_d, qk_scale, partition_size, upcast, precision)
        return out
    # Rows per program: one query token's whole group for decode-only batches, ~64 rows otherwise; tl.dot on
    # GPU needs at least 16.
    block_q = 1 if meta.max_query_len == 1 else max(1, 64 // group_pad)
    block_m = max(16, block_q * group_pad)
    # 8 warps for 64 x 128 tiles: with 4, ptxas needs 255 registers per thread on sm_80 (the cap) and 185 on
    # sm_90; with 8, 128 and 140 (tests/engine/kernels/gpu_compile_check.py prints these).
    grid = (meta.num_seqs, num_kv_heads, triton.cdiv(meta.max_query_len, block_q))
    _paged_attention_kernel[grid](
        q, kv_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_table,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_strides, meta.block_table.stride(0),
        head_size, qk_scale, KV_BLOCK_SIZE=kv_cache.shape[2],
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=BLOCK_N,
        UPCAST=upcast, DOT_PRECISION=precision, num_warps=8 if block_m * block_d >= 64 * 128 else 4,
    )  # fmt: skip
    return out


def _split_kv(
    q: Tensor,
    kv_cache: Tensor,
    meta: AttentionMetadata,
    out: Tensor,
    group: int,
    block_d: int,
    qk_scale: float,
    partition_size: int,
    upcast: bool,
    precision: str,
) -> None:
    num_seqs, num_q_heads, head_size = q.shape
    num_kv_heads = kv_cache.shape[3]
    num_partitions = triton.cdiv(meta.max_seq_len, partition_size)
    partial_out = torch.empty(
        (num_seqs, num_q_heads, num_partitions, block_d), dtype=torch.float32, device=q.device
    )
    partial_max = torch.empty((num_seqs, num_q_heads, num_partitions), dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    cache_strides = (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3))
    _split_kv_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, kv_cache, partial_out, partial_max, partial_sum, meta.seq_lens, meta.block_table,
        q.stride(0), q.stride(1), *cache_strides, meta.block_table.stride(0),
        num_q_heads, num_partitions, head_size, qk_scale, KV_BLOCK_SIZE=kv_cache.shape[2],
        PARTITION_SIZE=partition_size, GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, BLOCK_N=BLOCK_N, UPCAST=upcast, DOT_PRECISION=precision, num_warps=4,
    )  # fmt: skip
    _split_kv_reduce_kernel[(num_seqs, num_q_heads)](
        partial_out, partial_max, partial_sum, out, meta.seq_lens, out.stride(0), out.stride(1),
        num_q_heads, num_partitions, head_size,
        PARTITION_SIZE=partition_size, BLOCK_P=triton.next_power_of_2(num_partitions), BLOCK_D=block_d,
    )  # fmt: skip
