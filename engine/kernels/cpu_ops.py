"""The CPU ops `dispatch` picks for CPU tensors: torch_ops', except RMSNorm (plain and fused with the
residual add), neox rotary, SiLU-and-multiply, the KV cache write and paged attention (decode rows and
prompt chunks) with float32 activations, which run as one C call each (cpu_ops.c) when the CPU kernels
are built.

Why: in a one-stream decode step of a small model those ops were most of the time outside the matmuls.
torch runs RMSNorm as about ten small ops (30 us a call on the Zen 4 VM), rotary as about eight per
tensor, and decode attention as a block gather, an upcast copy, a mask and SDPA; each C call is one pass,
and the C attention was 2.7-3.3x faster than torch's for prompts of 128-2,048 tokens too
(benchmarks/RESULTS.md). Results equal torch_ops' up to float32 rounding. Other dtypes and layouts, and
hosts without a C compiler, use torch_ops unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.attention import AttentionMetadata
from engine.kernels import cpu_quant, torch_ops
from engine.kernels.torch_ops import _StepMemo

__all__ = [
    "fused_add_rms_norm",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv_cache",
]


def _fast(*tensors: Tensor) -> bool:
    """float32 CPU tensors whose rows are contiguous, with the kernels built."""
    return (
        all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)
        and cpu_quant.library() is not None
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if x.dim() == 2 and x.is_contiguous() and _fast(x, weight) and weight.is_contiguous():
        return cpu_quant.rms_norm(x, weight, eps)[0]
    return torch_ops.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    contiguous = x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous()
    if x.dim() == 2 and x.shape == residual.shape and contiguous and _fast(x, residual, weight):
        return cpu_quant.rms_norm(x, weight, eps, residual)
    return torch_ops.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:]  [T, I]."""
    if x.dim() == 2 and x.is_contiguous() and x.shape[1] % 32 == 0 and _fast(x):
        return cpu_quant.silu_and_mul(x)
    return torch_ops.silu_and_mul(x)


def write_kv_cache(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatters this step's k, v [T, Hkv, D] into the paged cache [2, num_blocks, block_size, Hkv, D]."""
    heads_packed = k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2]
    if (
        heads_packed
        and k.shape[2] % 16 == 0
        and kv_cache.dtype in (torch.float16, torch.float32)
        and kv_cache.is_contiguous()
        and slot_mapping.dtype == torch.int64
        and slot_mapping.is_contiguous()
        and _fast(k, v)
    ):
        cpu_quant.write_kv(k, v, kv_cache, slot_mapping)
        return
    torch_ops.write_kv_cache(k, v, kv_cache, slot_mapping)


def rotary_embedding(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor, is_neox: bool
) -> tuple[Tensor, Tensor]:
    """Rotates the first rot_dim dims of every head of q [T, Hq, D] and k [T, Hkv, D]."""
    heads_packed = q.stride(1) == q.shape[2] and k.stride(1) == k.shape[2]
    if (
        is_neox
        and heads_packed
        and positions.dtype == torch.int64
        and positions.is_contiguous()
        and cos_sin_cache.is_contiguous()
        and _fast(q, k, cos_sin_cache)
    ):
        return cpu_quant.rotary_neox(positions, q, k, cos_sin_cache)
    return torch_ops.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)


def paged_attention(q: Tensor, kv_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """Causal attention for a mixed prefill + decode batch, reading K/V from the paged cache (torch_ops'
    contract); float32 queries run in C, decode rows and prompt chunks alike."""
    tokens, q_heads, head_dim = q.shape
    if not (
        head_dim % 16 == 0
        and head_dim <= 256
        and q_heads % kv_cache.shape[3] == 0
        and q.is_contiguous()
        and kv_cache.dtype in (torch.float16, torch.float32)
        and kv_cache.is_contiguous()
        and meta.block_table.dtype == torch.int32
        and meta.block_table.stride(1) == 1
        and meta.seq_lens.dtype == torch.int32
        and meta.seq_lens.is_contiguous()
        and bool(meta.query_start_loc_cpu)
        and _fast(q)
    ):
        return torch_ops.paged_attention(q, kv_cache, meta, scale)
    num_seqs = len(meta.query_start_loc_cpu) - 1
    if meta.max_query_len == 1 and meta.query_start_loc_cpu[-1] == tokens == num_seqs:
        # Decode only: token i is sequence i and sees its whole length, read from the tensor itself (so a
        # recorded CPU graph replays with each step's lengths).
        return cpu_quant.paged_attention(q, kv_cache, meta.block_table, meta.seq_lens, scale)
    spans = _spans_memo.get((meta,), lambda: _token_spans(meta, tokens))
    if len(spans[0]) != tokens:  # the same step's metadata with a different row count (padding)
        spans = _token_spans(meta, tokens)
    token_seq, token_len = spans
    return cpu_quant.paged_attention(q, kv_cache, meta.block_table, token_len, scale, token_seq)


_spans_memo: _StepMemo[tuple[Tensor, Tensor]] = _StepMemo()  # every layer of a step shares its meta


def _token_spans(meta: AttentionMetadata, tokens: int) -> tuple[Tensor, Tensor]:
    """Each query token's sequence and how many positions it attends to (its own included); padding
    tokens past query_start_loc[-1] get length 0."""
    starts = torch.tensor(meta.query_start_loc_cpu, dtype=torch.int64)
    counts = starts[1:] - starts[:-1]
    seq = torch.repeat_interleave(torch.arange(len(counts)), counts)
    seq_lens = torch.tensor(meta.seq_lens_cpu, dtype=torch.int64)
    offset = torch.arange(len(seq)) - starts[seq]  # the token's index among its sequence's new tokens
    lengths = seq_lens[seq] - counts[seq] + offset + 1
    pad = tokens - len(seq)
    token_seq = torch.cat([seq, torch.zeros(pad, dtype=torch.int64)]).to(torch.int32)
    token_len = torch.cat([lengths, torch.zeros(pad, dtype=torch.int64)]).to(torch.int32)
    return token_seq, token_len
