"""torch_ops against naive float64 references: norms, rotary, SiLU-and-mul, paged KV write and attention."""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.kernels import dispatch, torch_ops
from engine.layers.rotary import build_cos_sin_cache
from tests.engine.conftest import PagedBatchBuilder


def _rms_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("seed", [0, 1])
def test_rms_norm_and_fused_add(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 48, generator=gen)
    residual = torch.randn(7, 48, generator=gen)
    weight = torch.randn(48, generator=gen)
    out = torch_ops.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(
        out.double(), _rms_ref(x, weight, 1e-6), atol=1e-5, rtol=1e-5, msg=f"seed={seed}"
    )
    normed, summed = torch_ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(normed.double(), _rms_ref(x + residual, weight, 1e-6), atol=1e-5, rtol=1e-5)
    low = torch_ops.rms_norm(x.bfloat16(), weight.bfloat16(), 1e-6)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), _rms_ref(x, weight, 1e-6), atol=0.05, rtol=0.02)


def _rotary_ref(positions: torch.Tensor, x: torch.Tensor, cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Per-element rotation of pairs, in float64."""
    out = x.double().clone()
    rot_dim = cache.shape[1]
    half = rot_dim // 2
    for t, pos in enumerate(positions.tolist()):
        for i in range(half):
            cos, sin = cache[pos, i].item(), cache[pos, half + i].item()
            a, b = (i, i + half) if is_neox else (2 * i, 2 * i + 1)
            xa, xb = x[t, :, a].double(), x[t, :, b].double()
            out[t, :, a] = xa * cos - xb * sin
            out[t, :, b] = xb * cos + xa * sin
    return out


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [16, 8])
def test_rotary_embedding(is_neox: bool, rot_dim: int) -> None:
    gen = torch.Generator().manual_seed(3)
    cache = build_cos_sin_cache(rot_dim, 64, 10000.0, None)
    positions = torch.tensor([0, 5, 63, 17, 2])
    q = torch.randn(5, 4, 16, generator=gen)
    k = torch.randn(5, 2, 16, generator=gen)
    q_out, k_out = torch_ops.rotary_embedding(positions, q, k, cache, is_neox)
    torch.testing.assert_close(
        q_out.double(), _rotary_ref(positions, q, cache, is_neox), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        k_out.double(), _rotary_ref(positions, k, cache, is_neox), atol=1e-5, rtol=1e-5
    )
    # Position 0 is the identity rotation.
    torch.testing.assert_close(q_out[0], q[0])


def test_silu_and_mul() -> None:
    x = torch.randn(5, 2 * 24, generator=torch.Generator().manual_seed(4))
    x64 = x.double()
    ref = x64[:, :24] * torch.sigmoid(x64[:, :24]) * x64[:, 24:]
    torch.testing.assert_close(torch_ops.silu_and_mul(x).double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dispatch.silu_and_mul(x), torch_ops.silu_and_mul(x))


def _attention_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Q, Hq, D] are the last Q positions of keys/values [S, Hkv, D]; float64, causal, GQA."""
    query_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(num_heads):
        kh, vh = keys[:, h // group].double(), values[:, h // group].double()
        scores = q[:, h].double() @ kh.T * scale  # [Q, S]
        for j in range(query_len):
            visible = seq_len - query_len + j + 1
            weights = torch.softmax(scores[j, :visible], dim=-1)
            out[j, h] = weights @ vh[:visible]
    return out


# (cached context, new tokens) per sequence: decodes (new = 1), fresh prefills, chunked prefills.
BATCHES = [
    [(0, 7), (12, 1), (0, 1), (30, 1), (5, 9)],
    [(3, 1), (17, 1), (40, 1)],
    [(0, 13), (9, 4)],
    [(33, 1), (0, 21), (6, 1), (15, 15)],
]


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("batch_index", range(len(BATCHES)))
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_matches_reference(
    group: int, batch_index: int, block_size: int, paged_batch_builder: type[PagedBatchBuilder]
) -> None:
    seed = 100 * group + 10 * batch_index + block_size
    gen = torch.Generator().manual_seed(seed)
    num_kv_heads, head_dim = 2, 8
    num_heads = num_kv_heads * group
    seqs = BATCHES[batch_index]
    num_blocks = 1 + sum(math.ceil((c + n) / block_size) for c, n in seqs)
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim)
    builder = paged_batch_builder(num_blocks, block_size, seed)
    full_k = [torch.randn(c + n, num_kv_heads, head_dim, generator=gen) for c, n in seqs]
    full_v = [torch.randn(c + n, num_kv_heads, head_dim, generator=gen) for c, n in seqs]

    # Earlier steps: write each sequence's cached context (in one or two chunks).
    context = {i: c for i, (c, _) in enumerate(seqs) if c}
    if context:
        meta, positions = builder.step(context)
        k_ctx = torch.cat([full_k[i][:c] for i, c in context.items()])
        v_ctx = torch.cat([full_v[i][:c] for i, c in context.items()])
        torch_ops.write_kv_cache(k_ctx, v_ctx, kv_cache, meta.slot_mapping)

    meta, positions = builder.step({i: n for i, (_, n) in enumerate(seqs)})
    k_new = torch.cat([full_k[i][c:] for i, (c, _) in enumerate(seqs)])
    v_new = torch.cat([full_v[i][c:] for i, (c, _) in enumerate(seqs)])
    q = torch.randn(k_new.shape[0], num_heads, head_dim, generator=gen)
    torch_ops.write_kv_cache(k_new, v_new, kv_cache, meta.slot_mapping)
    scale = head_dim**-0.5
    out = torch_ops.paged_attention(q, kv_cache, meta, scale)

    assert out.shape == q.shape
    for i in range(len(seqs)):
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        ref = _attention_ref(q[start:end], full_k[i], full_v[i], scale)
        torch.testing.assert_close(
            out[start:end].double(), ref, atol=1e-5, rtol=1e-5, msg=f"seed={seed} seq={i}"
        )


def test_write_kv_cache_places_tokens_at_slots() -> None:
    kv_cache = torch.zeros(2, 5, 4, 2, 3)
    k = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(5))
    v = k + 100
    slot_mapping = torch.tensor([9, 2, 19])  # block 2 offset 1, block 0 offset 2, block 4 offset 3
    torch_ops.write_kv_cache(k, v, kv_cache, slot_mapping)
    torch.testing.assert_close(kv_cache[0, 2, 1], k[0])
    torch.testing.assert_close(kv_cache[1, 0, 2], v[1])
    torch.testing.assert_close(kv_cache[0, 4, 3], k[2])
    assert int((kv_cache[0] != 0).sum()) == 3 * 2 * 3


def test_padded_tokens_write_null_block_and_output_zeros(
    paged_batch_builder: type[PagedBatchBuilder],
) -> None:
    """A runner may pad T (e.g. for graphs): padded tokens write to block 0 and get zero outputs."""
    rng = random.Random(6)
    gen = torch.Generator().manual_seed(6)
    builder = paged_batch_builder(8, 4, seed=6)
    kv_cache = torch.zeros(2, 8, 4, 2, 8)
    meta, _ = builder.step({0: 5, 1: 1})
    num_pad = rng.randint(1, 3)
    slot_mapping = torch.cat([meta.slot_mapping, torch.zeros(num_pad, dtype=torch.int64)])
    k = torch.randn(6 + num_pad, 2, 8, generator=gen)
    torch_ops.write_kv_cache(k, k, kv_cache, slot_mapping)
    q = torch.randn(6 + num_pad, 4, 8, generator=gen)
    out = torch_ops.paged_attention(q, kv_cache, meta, 0.5)
    assert torch.count_nonzero(out[6:]) == 0
    ref = _attention_ref(q[:5], k[:5], k[:5], 0.5)
    torch.testing.assert_close(out[:5].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.05), (torch.float16, 5e-3)])
def test_low_precision_paged_attention_close_to_float32(
    paged_batch_builder: type[PagedBatchBuilder], dtype: torch.dtype, tol: float
) -> None:
    """Prefill and decode rows in one step; float16 computes in float32 on CPU (attention_dtype), so it
    must stay within float16's own rounding of the float32 result."""
    gen = torch.Generator().manual_seed(7)
    builder = paged_batch_builder(16, 4, seed=7)
    meta, _ = builder.step({0: 9, 1: 1, 2: 6})
    kv = torch.randn(16, 2, 8, generator=gen)
    q = torch.randn(16, 8, 8, generator=gen)
    cache32 = torch.zeros(2, 16, 4, 2, 8)
    cache_low = cache32.to(dtype)
    torch_ops.write_kv_cache(kv, kv, cache32, meta.slot_mapping)
    torch_ops.write_kv_cache(kv.to(dtype), kv.to(dtype), cache_low, meta.slot_mapping)
    out32 = torch_ops.paged_attention(q, cache32, meta, 0.35)
    out_low = torch_ops.paged_attention(q.to(dtype), cache_low, meta, 0.35)
    assert out_low.dtype == dtype
    torch.testing.assert_close(out_low.float(), out32, atol=tol, rtol=tol)
