"""CPU (and reference) implementations of the engine's fused ops, in plain torch.

The Triton twins in `triton_ops` share these exact signatures; `dispatch` picks one by device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.attention import AttentionMetadata

_T = TypeVar("_T")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim of x [T, H]; statistics in float32 whatever the input dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    # Cast before scaling, as the reference models do, so low-precision outputs round the same way.
    return normed.to(x.dtype) * weight


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, is_neox: bool) -> Tensor:
    # x [T, H, D]; cos/sin [T, 1, rot_dim / 2]
    rot_dim = cos.shape[-1] * 2
    rot = x[..., :rot_dim]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if rot_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rot_dim:]), dim=-1)


class _StepMemo(Generic[_T]):
    """Remembers one value per step: every layer of a forward pass gets the same positions tensor and
    metadata object, so what depends only on them is computed by the first layer and reused by the rest
    (on CPU, such small ops cost as much as the matmuls of a small model). Keys are held, so their
    identities cannot be reused by other objects while remembered; per thread, so two models running
    forward passes in two threads never see each other's values."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, key: tuple[object, ...], compute: Callable[[], _T]) -> _T:
        held: tuple[tuple[object, ...], _T] | None = getattr(self._local, "held", None)
        if held is not None and _same_objects(key, held[0]):
            return held[1]
        value = compute()
        self._local.held = (key, value)  # key and value replaced together
        return value


def _same_objects(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


_cos_sin_memo: _StepMemo[tuple[Tensor, Tensor]] = _StepMemo()
_attention_plan_memo: _StepMemo[_AttentionPlan] = _StepMemo()


def rotary_embedding(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor, is_neox: bool
) -> tuple[Tensor, Tensor]:
    """Rotates the first rot_dim dims of every head of q [T, Hq, D] and k [T, Hkv, D]."""

    def gather() -> tuple[Tensor, Tensor]:
        cos_sin = cos_sin_cache.index_select(0, positions).to(q.dtype)  # [T, rot_dim]
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)  # each [T, 1, rot_dim / 2]
        return cos, sin

    cos, sin = _cos_sin_memo.get((positions, cos_sin_cache, q.dtype), gather)
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2 * I] -> silu(x[:, :I]) * x[:, I:]  [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def write_kv_cache(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatters this step's k, v [T, Hkv, D] into the paged cache [2, num_blocks, block_size, Hkv, D]."""
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype attention computes in: float32 for a float16 cache on CPU, whose float16 SDPA has no fast
    kernel without AVX512-FP16 (upcasting K, V and q was 1.7-2x faster on the Zen 4 VM and closer to the
    float64 result; benchmarks/RESULTS.md), else the cache's own."""
    return torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype


def _gather_context(kv_cache: Tensor, block_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """block_ids [B, num_blocks] -> K and V stacked as [2, B, Hkv, num_blocks * block_size, D] in dtype."""
    batch, num_blocks = block_ids.shape
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    # index_select on the block axis gathers K and V in one pass; plain advanced indexing is slower.
    gathered = kv_cache.index_select(1, block_ids.reshape(-1))
    gathered = gathered.view(2, batch, num_blocks * block_size, num_kv_heads, head_dim).transpose(2, 3)
    if dtype == kv_cache.dtype:
        return gathered.contiguous()
    # The new layout and the new dtype in one copy.
    return torch.empty(gathered.shape, dtype=dtype, device=gathered.device).copy_(gathered)


@dataclass
class _DecodePlan:
    token_ids: Tensor | None  # flat rows of the decode tokens; None when every sequence is a decode
    block_ids: Tensor  # [B, num_blocks] int64
    mask: Tensor  # [B, 1, 1, num_blocks * block_size] bool: positions inside each context


@dataclass
class _AttentionPlan:
    """What the torch attention needs from the metadata, built once per step (see _StepMemo)."""

    decode: _DecodePlan | None
    prefills: list[tuple[int, int, Tensor, int]]  # (first row, end row, block ids int64, seq_len)


def _plan(meta: AttentionMetadata, block_size: int, device: torch.device) -> _AttentionPlan:
    starts = meta.query_start_loc_cpu
    seq_lens = meta.seq_lens_cpu
    decode_seqs = [i for i in range(meta.num_seqs) if starts[i + 1] - starts[i] == 1]
    decode = None
    if decode_seqs:
        num_blocks = -(-max(seq_lens[i] for i in decode_seqs) // block_size)
        if len(decode_seqs) == meta.num_seqs:
            token_ids = None
            block_ids = meta.block_table[:, :num_blocks]
            lens = meta.seq_lens
        else:
            token_ids = torch.tensor([starts[i] for i in decode_seqs], device=device)
            seq_idx = torch.tensor(decode_seqs, device=device)
            block_ids = meta.block_table[seq_idx, :num_blocks]
            lens = meta.seq_lens[seq_idx]
        mask = torch.arange(num_blocks * block_size, device=device) < lens.unsqueeze(1)  # [B, L]
        decode = _DecodePlan(token_ids, block_ids.long(), mask[:, None, None, :])
    prefills = []
    for i in range(meta.num_seqs):
        start, end = starts[i], starts[i + 1]
        if end - start > 1:
            num_blocks = -(-seq_lens[i] // block_size)
            prefills.append((start, end, meta.block_table[i, :num_blocks].long(), seq_lens[i]))
    return _AttentionPlan(decode, prefills)


def _decode_attention(q: Tensor, kv_cache: Tensor, plan: _DecodePlan, scale: float) -> Tensor:
    """All single-token decodes at once: q [B, Hq, D] -> [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    dtype = attention_dtype(q.dtype, q.device)
    keys, values = _gather_context(kv_cache, plan.block_ids, dtype)  # each [B, Hkv, L, D]
    num_kv_heads = keys.shape[1]
    # One query per sequence, so the `group` query heads sharing a KV head can stand in for
    # the query-length axis: GQA without repeating K/V.
    grouped_q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).to(dtype)
    out = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=plan.mask, scale=scale)
    return out.to(q.dtype).reshape(batch, num_heads, head_dim)  # from [B, Hkv, group, D]


def _prefill_attention(q: Tensor, kv_cache: Tensor, block_ids: Tensor, seq_len: int, scale: float) -> Tensor:
    """One sequence's chunk: q [Q, Hq, D] are the last Q positions of a seq_len-long context."""
    query_len = q.shape[0]
    dtype = attention_dtype(q.dtype, q.device)
    keys, values = _gather_context(kv_cache, block_ids.unsqueeze(0), dtype)[:, 0, :, :seq_len]  # [Hkv, S, D]
    query = q.transpose(0, 1).to(dtype)  # [Hq, Q, D]
    if query_len == seq_len:
        out = F.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        # SDPA's is_causal aligns top-left; cached context needs bottom-right alignment.
        context_len = seq_len - query_len
        query_pos = torch.arange(query_len, device=q.device).unsqueeze(1) + context_len
        mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= query_pos  # [Q, S]
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out.transpose(0, 1).to(q.dtype)


def paged_attention(q: Tensor, kv_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """Causal attention for a mixed prefill + decode batch, reading K/V from the paged cache.

    q [T, Hq, D] -> [T, Hq, D]. Tokens past query_start_loc[-1] (padding) get zeros.
    """
    block_size = kv_cache.shape[2]
    plan = _attention_plan_memo.get((meta,), lambda: _plan(meta, block_size, q.device))
    num_real_tokens = meta.query_start_loc_cpu[-1] if meta.query_start_loc_cpu else 0
    decode = plan.decode
    if decode is not None and decode.token_ids is None and num_real_tokens == q.shape[0]:
        return _decode_attention(q, kv_cache, decode, scale)  # decode only: rows are already in order
    out = torch.empty_like(q)
    if num_real_tokens < q.shape[0]:
        out[num_real_tokens:].zero_()
    if decode is not None:
        rows = decode.token_ids
        if rows is None:
            out[:num_real_tokens] = _decode_attention(q[:num_real_tokens], kv_cache, decode, scale)
        else:
            out.index_copy_(0, rows, _decode_attention(q.index_select(0, rows), kv_cache, decode, scale))
    for start, end, block_ids, seq_len in plan.prefills:
        out[start:end] = _prefill_attention(q[start:end], kv_cache, block_ids, seq_len, scale)
    return out
