"""Which slice of each sharded dimension a rank holds: attention heads, FFN columns, vocabulary rows.

Pure arithmetic, no process group: the loader and the tests use it to cut checkpoint tensors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int

    def split(self, total: int) -> tuple[int, int]:
        """[lo, hi) of `total` for this rank; ranks differ by at most one when size does not divide it."""
        return self.rank * total // self.size, (self.rank + 1) * total // self.size

    def padded_split(self, total: int) -> tuple[int, int, int]:
        """(lo, hi, rows): equal slices of ceil(total / size) rows, the last ones padded past `total`
        (vocabulary sharding, whose all-gather needs equal pieces)."""
        rows = -(-total // self.size)
        lo = min(self.rank * rows, total)
        return lo, min(lo + rows, total), rows


@dataclass(frozen=True)
class HeadShard:
    q_lo: int  # query heads [q_lo, q_hi) of the checkpoint
    q_hi: int
    kv_lo: int  # KV heads [kv_lo, kv_hi); replicated ranks share the same one
    kv_hi: int

    @property
    def num_heads(self) -> int:
        return self.q_hi - self.q_lo

    @property
    def num_kv_heads(self) -> int:
        return self.kv_hi - self.kv_lo


def head_shard(tp: TensorParallel, num_heads: int, num_kv_heads: int) -> HeadShard:
    """Each rank takes whole KV groups (a KV head with its query heads), so attention stays local.

    With at least as many KV heads as ranks, the groups are split as evenly as they go (9 query and 3 KV
    heads over 2 ranks: 6+2 and 3+1). With fewer, each KV head is replicated on size / num_kv_heads ranks
    that split its query heads."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp.size:
        kv_lo, kv_hi = tp.split(num_kv_heads)
        return HeadShard(kv_lo * group, kv_hi * group, kv_lo, kv_hi)
    if tp.size % num_kv_heads:
        raise ValueError(
            f"tensor parallel size {tp.size} must divide or be a multiple of the model's "
            f"{num_kv_heads} KV heads"
        )
    replicas = tp.size // num_kv_heads
    if group < replicas:
        raise ValueError(
            f"tensor parallel size {tp.size} leaves some ranks without query heads "
            f"({num_heads} query heads, {num_kv_heads} KV heads)"
        )
    kv = tp.rank // replicas
    lo, hi = TensorParallel(tp.rank % replicas, replicas).split(group)
    return HeadShard(kv * group + lo, kv * group + hi, kv, kv + 1)


def check_shardable(
    size: int, *, num_heads: int, num_kv_heads: int, intermediate_size: int, vocab_size: int
) -> None:
    """Raises ValueError, at start-up, when a model cannot be cut into `size` ranks."""
    if size < 1:
        raise ValueError(f"tensor parallel size must be at least 1, got {size}")
    if size > intermediate_size or size > vocab_size:
        raise ValueError(f"tensor parallel size {size} is larger than the model's dimensions")
    for rank in range(size):
        head_shard(TensorParallel(rank, size), num_heads, num_kv_heads)
