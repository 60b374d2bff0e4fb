"""CUDA graphs for decode steps: one graph per padded batch size (1, 2, 4, 8, 16, ... up to max_num_seqs).

A decode-only batch of n sequences is padded to the next captured size: padded rows read and write
only the null block (block 0). Attention is forced onto the split-KV kernel with max_seq_len fixed at
the graph's context cap, so every launch grid is known at capture time. After capture, one padded batch
is checked against the eager model; any capture error or mismatch disables graphs with a warning
rather than risking wrong tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from engine.attention import AttentionMetadata, StaticDecodeInputs

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # graph.pool()'s type; a runtime import would be a cycle in torch

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, limit: int = 512) -> list[int]:
    sizes, size = [], 1
    while size < min(max_num_seqs, limit):
        sizes.append(size)
        size *= 2
    sizes.append(min(max_num_seqs, limit))
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        max_bs = self.sizes[-1]
        # Static buffers the graphs read; each run copies the real batch into their leading rows.
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)  # [B]
        self.inputs = StaticDecodeInputs(max_bs, max_model_len, block_size, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool: _POOL_HANDLE | None = (
            None  # the CUDA graphs' shared memory pool, once the first is captured
        )

    def _forward(self, size: int) -> torch.Tensor:
        # Split-KV attention, so every launch grid depends only on the context cap.
        meta = self.inputs.meta(size, split_kv=True)
        return self.model(self.input_ids[:size], self.inputs.positions[:size], self.kv_caches, meta)

    @torch.inference_mode()
    def capture(self) -> None:
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self._forward(size)  # warm-up: compiles the kernels outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self._forward(size)
            self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def padded_size(self, num_seqs: int) -> int | None:
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [n, H] for a decode-only batch of n <= the largest captured size."""
        n = meta.num_seqs
        size = self.padded_size(n)
        assert size is not None  # the caller checked can_run
        self.input_ids[:n].copy_(input_ids)
        self.inputs.load(positions, meta)
        self.input_ids[n:size].zero_()
        self.inputs.pad(n, size)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def can_run(self, meta: AttentionMetadata, has_embeds: bool) -> bool:
        return (
            not has_embeds
            and meta.max_query_len == 1
            and meta.max_seq_len <= self.max_model_len
            and self.padded_size(meta.num_seqs) is not None
        )


def build_decode_graphs(
    make: Callable[[], DecodeGraphs], check: Callable[[DecodeGraphs], bool]
) -> DecodeGraphs | None:
    """Captures the graphs and verifies them; None (eager decode) if either fails."""
    try:
        graphs = make()
        graphs.capture()
    except Exception:
        logger.warning("CUDA graph capture failed; decoding eagerly", exc_info=True)
        return None
    if not check(graphs):
        logger.warning("CUDA graph output differs from the eager model; decoding eagerly")
        return None
    return graphs
