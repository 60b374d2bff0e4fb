"""What rank 0 tells the other ranks: a command header over a pipe per worker, then the command's
tensors as torch.distributed broadcasts.

The header (8 int64s, raw bytes: nothing is pickled) goes over a `multiprocessing` pipe, not a
collective, so an idle worker waits on it for as long as the engine is idle: a collective would fail
after the group's timeout. A step is then one int64 payload packing input ids, positions and the
attention metadata (plus the input embeddings when the step has them): a few KB per step, whatever the
batch's history. vLLM instead keeps each request's state on the workers and sends only what changed;
with inputs this small, the flat resend is simpler and costs about the same on one host.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist
from torch import Tensor

from engine.attention import AttentionMetadata

_HEADER_SLOTS = 8
_HEADER = struct.Struct(f"<{_HEADER_SLOTS}q")


class Command(IntEnum):
    STEP = 1  # a forward pass: header [cmd, tokens, seqs, blocks per seq, has embeds, max query, max seq]
    LOGITS = 2  # LM head over hidden rows rank 0 sends: header [cmd, rows]
    EMBED = 3  # embedding lookup of token ids: header [cmd, tokens]
    STOP = 4  # the engine is shutting down
    COPY = 5  # KV slot copies before a step (kv_copy.py): header [cmd, copies], then [copies, 3] int64


class CommandChannel:
    def __init__(
        self, device: torch.device, dtype: torch.dtype, hidden_size: int, pipes: list[Connection]
    ) -> None:
        self.device = device
        self.dtype = dtype  # of hidden states and embeddings
        self.hidden_size = hidden_size
        self.pipes = pipes  # rank 0: one per worker; a worker: the one to rank 0

    # -- rank 0 ---------------------------------------------------------------------------------------
    def send_step(
        self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, inputs_embeds: Tensor | None
    ) -> None:
        num_seqs, max_blocks = meta.block_table.shape
        self._send_header(
            Command.STEP,
            input_ids.shape[0],
            num_seqs,
            max_blocks,
            int(inputs_embeds is not None),
            meta.max_query_len,
            meta.max_seq_len,
        )
        parts = (
            input_ids,
            positions,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_table,
            meta.slot_mapping,
        )
        dist.broadcast(torch.cat([p.reshape(-1).to(torch.int64) for p in parts]), src=0)
        if inputs_embeds is not None:
            dist.broadcast(inputs_embeds.to(self.dtype).contiguous(), src=0)

    def send_rows(self, command: Command, rows: Tensor) -> None:
        """LOGITS with hidden rows [N, H], EMBED with token ids [T], or COPY with copies [n, 3] int64."""
        self._send_header(command, rows.shape[0])
        dist.broadcast(rows.contiguous(), src=0)

    def send_stop(self) -> None:
        self._send_header(Command.STOP)

    def _send_header(self, command: Command, *values: int) -> None:
        header = _HEADER.pack(int(command), *values, *[0] * (_HEADER_SLOTS - 1 - len(values)))
        for pipe in self.pipes:
            pipe.send_bytes(header)

    # -- ranks 1..N-1 -----------------------------------------------------------------------------------
    def receive_header(self) -> list[int]:
        """Blocks until rank 0 sends a command; EOFError once rank 0 is gone."""
        return list(_HEADER.unpack(self.pipes[0].recv_bytes()))

    def receive_step(self, header: list[int]) -> tuple[Tensor, Tensor, AttentionMetadata, Tensor | None]:
        """(input_ids, positions, metadata, inputs_embeds) of a STEP header."""
        _, num_tokens, num_seqs, max_blocks, has_embeds, max_query_len, max_seq_len, _ = header
        sizes = [num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * max_blocks, num_tokens]
        payload = torch.empty(sum(sizes), dtype=torch.int64, device=self.device)
        dist.broadcast(payload, src=0)
        input_ids, positions, qsl, seq_lens, block_table, slots = payload.split(sizes)
        embeds = None
        if has_embeds:
            embeds = torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
            dist.broadcast(embeds, src=0)
        meta = AttentionMetadata(
            query_start_loc=qsl.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_table=block_table.to(torch.int32).view(num_seqs, max_blocks),
            slot_mapping=slots,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return input_ids, positions, meta, embeds

    def receive_rows(self, header: list[int]) -> Tensor:
        """The hidden rows [N, H] of a LOGITS header."""
        rows = torch.empty(header[1], self.hidden_size, dtype=self.dtype, device=self.device)
        dist.broadcast(rows, src=0)
        return rows

    def receive_ids(self, header: list[int]) -> Tensor:
        """The token ids [T] of an EMBED header."""
        ids = torch.empty(header[1], dtype=torch.int64, device=self.device)
        dist.broadcast(ids, src=0)
        return ids

    def receive_copies(self, header: list[int]) -> Tensor:
        """The copies [n, 3] int64 (src, dst, num_slots) of a COPY header, on the CPU."""
        copies = torch.empty(header[1], 3, dtype=torch.int64, device=self.device)
        dist.broadcast(copies, src=0)
        return copies.cpu()
