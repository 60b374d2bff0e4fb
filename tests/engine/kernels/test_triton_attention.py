"""Triton paged attention (single-pass and split-KV) against a float64 gather-then-attend reference."""

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.kernels import triton_attention, triton_ops
from tests.engine.kernels import reference
from tests.engine.kernels.reference import rel_error

BLOCK_SIZE = 16


def _build_batch(
    seed: int,
    seqs: list[tuple[int, int]],
    num_kv_heads: int,
    group: int,
    head_size: int,
    dtype: torch.dtype,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """seqs: (seq_len, q_len) per sequence. Returns q, a random cache and metadata with shuffled block tables."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-seq_len // BLOCK_SIZE) for seq_len, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    # Every sequence gets scattered, non-contiguous physical blocks.
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq)
    block_table = torch.zeros(len(seqs), max_blocks + 1, dtype=torch.int32)
    slot_mapping = []
    for i, ((seq_len, q_len), num) in enumerate(zip(seqs, blocks_per_seq, strict=True)):
        block_table[i, :num] = torch.tensor(physical[:num], dtype=torch.int32)
        physical = physical[num:]
        for pos in range(seq_len - q_len, seq_len):
            slot_mapping.append(int(block_table[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
    query_start_loc = [0]
    for _, q_len in seqs:
        query_start_loc.append(query_start_loc[-1] + q_len)
    num_q_heads = num_kv_heads * group
    q = torch.randn(query_start_loc[-1], num_q_heads, head_size, generator=gen).to(dtype=dtype, device=device)
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_size, generator=gen)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        max_query_len=max(q_len for _, q_len in seqs),
        max_seq_len=max(s for s, _ in seqs),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=[s for s, _ in seqs],
    )
    return q, kv_cache.to(dtype=dtype, device=device), meta


def _check(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, tol: float, seed: int, **kwargs: object
) -> None:
    scale = q.shape[-1] ** -0.5
    out = triton_ops.paged_attention(q, kv_cache, meta, scale, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = reference.paged_attention(
        q.cpu(), kv_cache.cpu(), meta.block_table.cpu(), meta.query_start_loc_cpu, meta.seq_lens_cpu, scale
    )
    err = rel_error(out.cpu(), expected)
    assert err < tol, f"seed={seed} rel_error={err:.2e}"


# A full prefill, a decode, a chunked-prefill continuation and a short decode, none a multiple of the block size.
MIXED = [(37, 37), (50, 1), (45, 13), (20, 1)]


@pytest.mark.parametrize("head_size", [64, 80, 96, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_mixed_batch(device: str, group: int, head_size: int) -> None:
    seed = 1000 + 10 * group + head_size
    q, kv_cache, meta = _build_batch(seed, MIXED, 2, group, head_size, torch.float32, device)
    _check(q, kv_cache, meta, 1e-3, seed, split_kv=False)


def test_group_not_a_power_of_two_strided_q(device: str) -> None:
    # SmolLM2's shape: 9 query heads over 3 KV heads, head_dim 64; q is a view into a fused qkv tensor.
    seed = 2000
    q, kv_cache, meta = _build_batch(seed, MIXED, 3, 3, 64, torch.float32, device)
    qkv = torch.cat([q.flatten(1), torch.zeros(q.shape[0], 2 * 3 * 64, device=device)], dim=1)
    q_view = qkv[:, : 9 * 64].view(-1, 9, 64)
    assert not q_view.is_contiguous()
    _check(q_view, kv_cache, meta, 1e-3, seed)


def test_long_prefill_spans_many_kv_tiles(device: str) -> None:
    # 150 new tokens after 60 cached ones: several query tiles and K/V tiles, unmasked and diagonal.
    seed = 2001
    q, kv_cache, meta = _build_batch(seed, [(210, 150), (3, 3)], 1, 4, 64, torch.float32, device)
    _check(q, kv_cache, meta, 1e-3, seed)


def test_decode_only_single_pass(device: str) -> None:
    seed = 2002
    q, kv_cache, meta = _build_batch(seed, [(1, 1), (130, 1), (64, 1)], 2, 4, 128, torch.float32, device)
    _check(q, kv_cache, meta, 1e-3, seed, split_kv=False)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_split_kv_decode(device: str, group: int) -> None:
    # Partitions of 64 positions: 200 spans four (the last partial), 7 only one, 128 exactly two.
    seed = 3000 + group
    q, kv_cache, meta = _build_batch(seed, [(200, 1), (7, 1), (128, 1)], 2, group, 96, torch.float32, device)
    _check(q, kv_cache, meta, 1e-3, seed, split_kv=True, partition_size=64)


def test_split_kv_matches_single_pass(device: str) -> None:
    seed = 3100
    q, kv_cache, meta = _build_batch(seed, [(190, 1), (77, 1)], 1, 8, 80, torch.float32, device)
    scale = 80**-0.5
    split = triton_ops.paged_attention(q, kv_cache, meta, scale, split_kv=True, partition_size=64)
    single = triton_ops.paged_attention(q, kv_cache, meta, scale, split_kv=False)
    assert rel_error(split.cpu(), single.cpu()) < 1e-5, f"seed={seed}"


@pytest.mark.parametrize("split_kv", [False, True], ids=["single", "split"])
def test_bf16(device: str, split_kv: bool) -> None:
    seed = 4000 + split_kv
    seqs = [(70, 1), (33, 1)] if split_kv else MIXED
    q, kv_cache, meta = _build_batch(seed, seqs, 2, 4, 128, torch.bfloat16, device)
    _check(q, kv_cache, meta, 2e-2, seed, split_kv=split_kv, partition_size=64)


def test_split_kv_rejects_prefill(device: str) -> None:
    q, kv_cache, meta = _build_batch(5000, [(20, 4)], 1, 1, 64, torch.float32, device)
    with pytest.raises(ValueError, match="decode-only"):
        triton_ops.paged_attention(q, kv_cache, meta, 0.125, split_kv=True)


def test_split_kv_heuristic() -> None:
    def meta(seq_lens: list[int], q_lens: list[int]) -> AttentionMetadata:
        loc = [0]
        for q_len in q_lens:
            loc.append(loc[-1] + q_len)
        empty = torch.empty(0)
        return AttentionMetadata(empty, empty, empty, empty, max(q_lens), max(seq_lens), loc, seq_lens)

    partition = triton_attention.DEFAULT_PARTITION_SIZE
    # Few long decodes: split so the GPU has enough programs.
    assert triton_ops.should_split_kv(meta([8192], [1]), 8, partition)
    # Short contexts, any prefill, or many sequences: one pass.
    assert not triton_ops.should_split_kv(meta([300], [1]), 8, partition)
    assert not triton_ops.should_split_kv(meta([8192, 100], [1, 5]), 8, partition)
    assert not triton_ops.should_split_kv(meta([8192] * 64, [1] * 64), 8, partition)
