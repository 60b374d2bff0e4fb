"""CPU (and reference) implementations of the engine's fused ops, in plain torch.

The Triton twins in `triton_ops` share these exact signatures; `dispatch` picks one by device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.attention import AttentionMetadata


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


def rotary_embedding(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor, is_neox: bool
) -> tuple[Tensor, Tensor]:
    """Rotates the first rot_dim dims of every head of q [T, Hq, D] and k [T, Hkv, D]."""
    cos_sin = cos_sin_cache.index_select(0, positions).to(q.dtype)  # [T, rot_dim]
    cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)  # each [T, 1, rot_dim / 2]
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


def _gather_context(kv_cache: Tensor, block_ids: Tensor) -> Tensor:
    """block_ids [B, num_blocks] -> K and V stacked as [2, B, Hkv, num_blocks * block_size, D]."""
    batch, num_blocks = block_ids.shape
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    # index_select on the block axis gathers K and V in one pass; plain advanced indexing is slower.
    gathered = kv_cache.index_select(1, block_ids.reshape(-1))
    gathered = gathered.view(2, batch, num_blocks * block_size, num_kv_heads, head_dim)
    return gathered.transpose(2, 3).contiguous()


def _decode_attention(
    q: Tensor, kv_cache: Tensor, block_ids: Tensor, seq_lens: Tensor, scale: float
) -> Tensor:
    """All single-token decodes at once: q [B, Hq, D] -> [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    keys, values = _gather_context(kv_cache, block_ids)  # each [B, Hkv, L, D]
    num_kv_heads = keys.shape[1]
    # One query per sequence, so the `group` query heads sharing a KV head can stand in for
    # the query-length axis: GQA without repeating K/V.
    grouped_q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = torch.arange(keys.shape[2], device=q.device) < seq_lens.unsqueeze(1)  # [B, L]
    out = F.scaled_dot_product_attention(
        grouped_q, keys, values, attn_mask=mask[:, None, None, :], scale=scale
    )  # [B, Hkv, group, D]
    return out.reshape(batch, num_heads, head_dim)


def _prefill_attention(q: Tensor, kv_cache: Tensor, block_ids: Tensor, seq_len: int, scale: float) -> Tensor:
    """One sequence's chunk: q [Q, Hq, D] are the last Q positions of a seq_len-long context."""
    query_len = q.shape[0]
    keys, values = _gather_context(kv_cache, block_ids.unsqueeze(0))[:, 0, :, :seq_len]  # [Hkv, S, D]
    query = q.transpose(0, 1)  # [Hq, Q, D]
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
    return out.transpose(0, 1)


def paged_attention(q: Tensor, kv_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """Causal attention for a mixed prefill + decode batch, reading K/V from the paged cache.

    q [T, Hq, D] -> [T, Hq, D]. Tokens past query_start_loc[-1] (padding) get zeros.
    """
    block_size = kv_cache.shape[2]
    starts = meta.query_start_loc_cpu
    seq_lens = meta.seq_lens_cpu
    out = torch.empty_like(q)
    num_real_tokens = starts[-1] if starts else 0
    if num_real_tokens < q.shape[0]:
        out[num_real_tokens:].zero_()

    decode_seqs = [i for i in range(meta.num_seqs) if starts[i + 1] - starts[i] == 1]
    if decode_seqs:
        token_ids = torch.tensor([starts[i] for i in decode_seqs], device=q.device)
        num_blocks = -(-max(seq_lens[i] for i in decode_seqs) // block_size)
        if len(decode_seqs) == meta.num_seqs:
            rows = meta.block_table[:, :num_blocks]
            dec_lens = meta.seq_lens
        else:
            seq_idx = torch.tensor(decode_seqs, device=q.device)
            rows = meta.block_table[seq_idx, :num_blocks]
            dec_lens = meta.seq_lens[seq_idx]
        dec_out = _decode_attention(q.index_select(0, token_ids), kv_cache, rows.long(), dec_lens, scale)
        out.index_copy_(0, token_ids, dec_out)

    for i in range(meta.num_seqs):
        start, end = starts[i], starts[i + 1]
        if end - start <= 1:
            continue
        num_blocks = -(-seq_lens[i] // block_size)
        block_ids = meta.block_table[i, :num_blocks].long()
        out[start:end] = _prefill_attention(q[start:end], kv_cache, block_ids, seq_lens[i], scale)
    return out
