"""KV slot copies a step's plan asks for (kv_cache.BlockCopy): a prompt that repeats where an earlier
request's tokens ended takes the KV of those tokens from the earlier request's block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from engine.kv_cache import BlockCopy


def copy_block_slots(model: Any, kv_caches: list[Tensor], copies: Sequence[BlockCopy]) -> None:
    """Copies on every layer's cache [2, num_blocks, block_size, Hkv, D]; under tensor parallelism the
    model (rank 0's stand-in) has the other ranks copy their shards too."""
    if not copies:
        return
    tell_workers = getattr(model, "copy_block_slots", None)
    if tell_workers is not None:
        tell_workers(copies)
    apply_block_copies(kv_caches, [(c.src, c.dst, c.num_slots) for c in copies])


def copies_tensor(copies: Sequence[BlockCopy]) -> Tensor:
    """[n, 3] int64 (src, dst, num_slots): the form the copies cross process boundaries in."""
    return torch.tensor([[c.src, c.dst, c.num_slots] for c in copies], dtype=torch.int64)


def apply_block_copies(kv_caches: list[Tensor], copies: Sequence[Sequence[int]]) -> None:
    """Runs (src, dst, num_slots) copies on this rank's caches (a worker: its copies_tensor().tolist())."""
    for src, dst, num_slots in copies:
        for cache in kv_caches:
            cache[:, dst, :num_slots] = cache[:, src, :num_slots]
