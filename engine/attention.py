"""Attention metadata for one engine step: the flat, paged view of a mixed prefill + decode batch.

Built once per step by the model runner and passed explicitly to every attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    # Sequences are laid out back to back in the flat token dimension: sequence i owns
    # tokens query_start_loc[i] : query_start_loc[i + 1] of q/k/v.
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, on the model's device
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new tokens)
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32: physical block ids, row i for seq i
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset for each new token
    max_query_len: int
    max_seq_len: int
    # Host copies, so the CPU path can loop over sequences without device syncs.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Force the GPU attention path (None: the kernel's heuristic). CUDA-graph capture forces split-KV so
    # the launch grid depends only on max_seq_len, which is then the graph's context cap.
    split_kv: bool | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
