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


class StaticDecodeInputs:
    """The fixed buffers a recorded decode step reads (engine/cuda_graphs.py, engine/cpu_graphs.py): each
    step copies its batch into their leading rows, and `meta(n)` describes the first n of them, with the
    context cap max_model_len as max_seq_len."""

    def __init__(self, rows: int, max_model_len: int, block_size: int, device: torch.device) -> None:
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(rows, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(rows, max_blocks, dtype=torch.int32, device=device)

    def load(self, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Copies a decode-only batch (one token per sequence) into the leading rows; returns its rows."""
        n = meta.num_seqs
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        width = meta.block_table.shape[1]
        self.block_table[:n, :width].copy_(meta.block_table)
        self.block_table[:n, width:].zero_()
        return n

    def pad(self, start: int, end: int) -> None:
        """Rows [start, end): one token at position 0 in the null block (block 0), never read by real rows."""
        self.positions[start:end].zero_()
        self.slot_mapping[start:end].zero_()
        self.seq_lens[start:end].fill_(1)
        self.block_table[start:end].zero_()

    def meta(self, n: int, split_kv: bool | None = None) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: n + 1],
            seq_lens=self.seq_lens[:n],
            block_table=self.block_table[:n],
            slot_mapping=self.slot_mapping[:n],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(n + 1)),
            seq_lens_cpu=[self.max_model_len] * n,
            split_kv=split_kv,
        )
