"""Turns a step's plan into flat model inputs, runs the model, and samples one token per finishing row.

The runner reads the plan (and, read-only, the requests it names) and returns a ModelRunnerOutput; it
changes no request: the scheduler applies the output. The only state it keeps across steps is the
seeded requests' generators (in the sampler), dropped when a plan lists those requests as finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.cpu_graphs import CpuDecodeGraphs
from engine.cuda_graphs import DecodeGraphs, build_decode_graphs
from engine.kv_cache import NULL_BLOCK_ID
from engine.kv_copy import copy_block_slots
from engine.readback import DeviceReadback, tensor_to_device, to_device
from engine.request import Request
from engine.sampler import PendingPromptLogprobs, Sampler, SampleResult, TokenBitmask
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.step_output import ModelRunnerOutput, PromptLogprobChunk

if TYPE_CHECKING:
    from engine.cpu_threads import StepThreads
    from engine.lora.manager import LoraManager
    from engine.models.config import ModelArchConfig
    from engine.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _all_kernels(model: object) -> bool:
    """Whether the model's linear layers multiply with GGUF blocks (so a decode step may be all C kernels:
    engine/cpu_graphs.py checks the rest while capturing)."""
    if not isinstance(model, torch.nn.Module):  # rank 0's stand-in under tensor parallelism: no blocks
        return False
    return any(getattr(m, "packed_weight", None) is not None for m in model.modules())


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,  # every causal LM family derives from it (engine/models/registry.py)
        arch: ModelArchConfig,
        *,
        num_blocks: int,
        block_size: int,
        kv_cache_dtype: torch.dtype,
        device: torch.device,
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        enforce_eager: bool = False,
        seed: int = 0,
        num_kv_heads: int | None = None,  # this rank's KV heads under tensor parallelism; None: the model's
        step_threads: StepThreads | None = None,  # CPU: each step's thread count from its size
    ) -> None:
        self.model = model
        self.arch = arch
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype  # may differ from the model's on CPU (--kv-cache-dtype)
        self.device = device
        num_layers = arch.num_hidden_layers
        kv_shape = (2, num_blocks, block_size, num_kv_heads or arch.num_key_value_heads, arch.head_dim)
        # [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim] per layer
        self.kv_caches = [
            torch.zeros(kv_shape, dtype=kv_cache_dtype, device=device) for _ in range(num_layers)
        ]
        self.sampler = Sampler(arch.vocab_size, device, seed)
        self.lora: LoraManager | None = None  # set by engine_setup with --enable-lora
        self.step_threads = step_threads
        self.graphs: DecodeGraphs | CpuDecodeGraphs | None = None
        if device.type == "cpu" and not enforce_eager and _all_kernels(model):
            self.graphs = CpuDecodeGraphs(
                model,
                self.kv_caches,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                block_size=block_size,
                hidden_size=arch.hidden_size,
                dtype=model.model.embed_tokens.weight.dtype,
            )
        if device.type == "cuda" and not enforce_eager:
            self.graphs = build_decode_graphs(
                lambda: DecodeGraphs(
                    model,
                    self.kv_caches,
                    max_num_seqs=max_num_seqs,
                    max_model_len=max_model_len,
                    block_size=block_size,
                    device=device,
                ),
                self._graphs_match_eager,
            )

    @torch.inference_mode()
    def _graphs_match_eager(self, graphs: DecodeGraphs) -> bool:
        """One padded decode batch (3 sequences in blocks 1-4, still unused at start-up) both ways."""
        bs = self.block_size
        seq_lens = [5, bs + 3, 2]
        meta = AttentionMetadata(
            query_start_loc=torch.arange(4, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_table=torch.tensor([[1, 0], [2, 3], [4, 0]], dtype=torch.int32, device=self.device),
            slot_mapping=torch.tensor(
                [1 * bs + 4, 3 * bs + 2, 4 * bs + 1], dtype=torch.int64, device=self.device
            ),
            max_query_len=1,
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=[0, 1, 2, 3],
            seq_lens_cpu=seq_lens,
        )
        input_ids = torch.tensor([11, 12, 13], dtype=torch.int64, device=self.device)
        positions = torch.tensor([s - 1 for s in seq_lens], dtype=torch.int64, device=self.device)
        eager = self.model(input_ids, positions, self.kv_caches, meta).float()
        graphed = graphs.run(input_ids, positions, meta).float()
        return bool(torch.allclose(eager, graphed, rtol=3e-2, atol=3e-2))

    def _build_inputs(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        max_blocks = max(len(row.request.block_ids) for row in out.rows)
        block_rows: list[list[int]] = []
        for row in out.rows:
            request, num_new, start = row.request, row.num_new, row.start
            if num_new == 1:
                token_ids.append(request.token_id_at(start))
            elif row.drafts:  # the last known token, then the drafts the model checks
                token_ids.append(request.token_id_at(start))
                token_ids.extend(row.drafts)
            else:
                token_ids.extend(request.all_token_ids[start : start + num_new])
            span = range(start, start + num_new)
            positions.extend(span)
            blocks = request.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in span)
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(start + num_new)
            block_rows.append(blocks + [NULL_BLOCK_ID] * (max_blocks - len(blocks)))
        block_table = torch.tensor(block_rows, dtype=torch.int32)  # [num_seqs, max_blocks]
        dev = self.device
        # Every input goes through pinned memory: on a GPU the copies are queued, never waited for.
        meta = AttentionMetadata(
            query_start_loc=to_device(query_start_loc, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            block_table=tensor_to_device(block_table, dev),
            slot_mapping=to_device(slots, torch.int64, dev),
            max_query_len=max(row.num_new for row in out.rows),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        input_ids = to_device(token_ids, torch.int64, dev)
        return input_ids, to_device(positions, torch.int64, dev), meta

    def _input_embeds(
        self, out: SchedulerOutput, input_ids: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """Token embeddings with prompt-embedding rows spliced in, or None when no row carries any."""
        if not any(row.request.prompt_embeds for row in out.rows):
            return None
        embeds = self.model.embed_input_ids(input_ids)  # [T, H]
        for index, row in enumerate(out.rows):
            start, num_new = row.start, row.num_new
            flat0 = meta.query_start_loc_cpu[index]
            for pe in row.request.prompt_embeds:
                lo, hi = max(pe.start, start), min(pe.end, start + num_new)
                if lo < hi:
                    rows = pe.rows[lo - pe.start : hi - pe.start]
                    rows = tensor_to_device(rows.to(embeds.dtype), self.device)
                    embeds[flat0 + lo - start : flat0 + hi - start] = rows
        return embeds

    def execute(
        self, out: SchedulerOutput, bitmask_for: Callable[[list[Request]], TokenBitmask | None] | None = None
    ) -> ModelRunnerOutput:
        """Runs one step (on CPU, small ones on one thread: engine/cpu_threads.py); see _execute."""
        if self.step_threads is None:
            return self._execute(out, bitmask_for)
        with self.step_threads.step(sum(row.num_new for row in out.rows)):
            return self._execute(out, bitmask_for)

    @torch.inference_mode()
    def _execute(
        self, out: SchedulerOutput, bitmask_for: Callable[[list[Request]], TokenBitmask | None] | None = None
    ) -> ModelRunnerOutput:
        """Runs one step. bitmask_for(requests that sample) gives their structured-output masks; it is called
        after the forward pass is queued, so on a GPU the grammar work overlaps the model's.

        The step reads from the device exactly once: sampled ids, logprobs and prompt logprobs together."""
        self.sampler.forget(out.finished_request_ids)
        copy_block_slots(self.model, self.kv_caches, out.block_copies)
        input_ids, positions, meta = self._build_inputs(out)
        inputs_embeds = self._input_embeds(out, input_ids, meta)
        if self.lora is not None:
            self.lora.prepare_step(out.scheduled)  # each token's adapter slot, read by the LoRA layers
        # Graphs replay one token per row only: can_run refuses any step where a row has drafts
        # (max_query_len > 1), so verify steps always run eagerly.
        hidden = None
        if self.graphs is not None and self.graphs.can_run(meta, has_embeds=inputs_embeds is not None):
            hidden = self.graphs.run(input_ids, positions, meta)
        if hidden is None:
            hidden = self.model(input_ids, positions, self.kv_caches, meta, inputs_embeds=inputs_embeds)
        readback = DeviceReadback()
        prompt_pending: dict[str, list[PendingPromptLogprobs]] = {}
        for index, row in enumerate(out.rows):
            if row.prompt_logprobs:
                flat0 = meta.query_start_loc_cpu[index]
                prompt_pending[row.request.request_id] = self._prompt_logprobs(row, hidden, flat0, readback)
        # Rows that reach the end of their known tokens sample a new one; mid-prompt chunks do not.
        sample_rows = [meta.query_start_loc_cpu[i + 1] - 1 for i, row in enumerate(out.rows) if row.samples]
        sample_requests = [row.request for row in out.rows if row.samples]
        verify = self._enqueue_verify(out, hidden, meta, readback)
        pending = None
        if sample_requests:
            last_hidden = hidden.index_select(0, to_device(sample_rows, torch.int64, self.device))
            logits = self.model.compute_logits(last_hidden)  # [N, V] float32
            bitmask = bitmask_for(sample_requests) if bitmask_for is not None else None
            pending = self.sampler.enqueue(logits, sample_requests, readback, bitmask)
        readback.fetch()
        result = ModelRunnerOutput()
        for request_id, pieces in prompt_pending.items():
            if pieces:
                rows = [r for piece in pieces for r in self.sampler.prompt_logprob_rows(piece, readback)]
                result.prompt_logprobs[request_id] = PromptLogprobChunk(pieces[0].start, rows)
        if verify is not None:
            slot, counts = verify
            targets = readback.get(slot).astype(np.int64).tolist()
            offset = 0
            for request_id, count in counts:
                result.draft_targets[request_id] = targets[offset : offset + count]
                offset += count
        if pending is None:
            return result
        sampled: SampleResult = self.sampler.result(pending, readback)
        for i, request in enumerate(sample_requests):
            result.sampled[request.request_id] = sampled.token_ids[i]
            lp = sampled.logprobs[i]
            if lp is not None:
                result.logprobs[request.request_id] = lp
        return result

    def _enqueue_verify(
        self, out: SchedulerOutput, hidden: torch.Tensor, meta: AttentionMetadata, readback: DeviceReadback
    ) -> tuple[int, list[tuple[str, int]]] | None:
        """Greedy argmax at every position of the rows with drafts (their requests have no logit
        processor: see engine/spec/eligibility.py), in one LM-head pass: (readback slot, per request
        (id, 1 + drafts)), or None when no row has drafts."""
        positions: list[int] = []
        counts: list[tuple[str, int]] = []
        for index, row in enumerate(out.rows):
            if row.drafts:
                flat0 = meta.query_start_loc_cpu[index]
                positions.extend(range(flat0, flat0 + row.num_new))
                counts.append((row.request.request_id, row.num_new))
        if not positions:
            return None
        rows = hidden.index_select(0, to_device(positions, torch.int64, self.device))
        logits = self.model.compute_logits(rows)[:, : self.sampler.vocab_size]  # [N, V] float32
        return readback.add(logits.argmax(dim=-1)), counts

    def _prompt_logprobs(
        self, row: ScheduledRequest, hidden: torch.Tensor, flat0: int, readback: DeviceReadback
    ) -> list[PendingPromptLogprobs]:
        """Logprobs of the prompt tokens this chunk predicts (the rows before the last prompt token)."""
        start = row.start
        end = min(start + row.num_new, row.request.num_prompt_tokens - 1)
        step = 256  # rows of [*, vocab] float32 logits at a time
        pieces = []
        for lo in range(start, end, step):
            hi = min(lo + step, end)
            logits = self.model.compute_logits(hidden[flat0 + lo - start : flat0 + hi - start])
            pieces.append(self.sampler.enqueue_prompt_logprobs(row.request, logits, lo, readback))
        return pieces
