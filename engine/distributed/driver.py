"""TensorParallelModel: rank 0's stand-in for the model. The model runner calls it like the model;
each call first tells the workers to make the same call on their shards, so the layers' collectives meet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from engine.attention import AttentionMetadata
from engine.distributed.channel import Command, CommandChannel
from engine.distributed.workers import TensorParallelWorkers
from engine.kv_cache import BlockCopy
from engine.kv_copy import copies_tensor
from engine.models.llama import LlamaForCausalLM


class TensorParallelModel:
    def __init__(
        self, model: LlamaForCausalLM, workers: TensorParallelWorkers, channel: CommandChannel
    ) -> None:
        self.model = model  # rank 0's shard
        self.arch = model.arch
        self.workers = workers
        self.channel = channel

    def __call__(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[Tensor],
        attn_metadata: AttentionMetadata,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        with self.workers.collective("forward step"):
            self.channel.send_step(input_ids, positions, attn_metadata, inputs_embeds)
            return self.model(input_ids, positions, kv_caches, attn_metadata, inputs_embeds=inputs_embeds)
        raise AssertionError("unreachable: a failed collective ends the process")

    def copy_block_slots(self, copies: Sequence[BlockCopy]) -> None:
        """Has the workers run a step's KV slot copies on their shards (rank 0 runs its own after)."""
        with self.workers.collective("KV copy"):
            self.channel.send_rows(Command.COPY, copies_tensor(copies).to(self.channel.device))

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """[N, H] -> [N, vocab] float32, gathered from every rank's vocabulary slice."""
        with self.workers.collective("LM head"):
            self.channel.send_rows(Command.LOGITS, hidden.to(self.channel.dtype))
            return self.model.compute_logits(hidden)
        raise AssertionError("unreachable: a failed collective ends the process")

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        """[T] -> [T, H] (prompt-embedding steps splice rows into it, then send it with the step)."""
        with self.workers.collective("embedding"):
            self.channel.send_rows(Command.EMBED, input_ids.to(torch.int64))
            return self.model.embed_input_ids(input_ids)
        raise AssertionError("unreachable: a failed collective ends the process")
