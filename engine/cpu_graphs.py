"""CPU graphs for decode steps: the CPU analogue of engine/cuda_graphs.py, for models whose decode step is
made only of the C kernels (engine/kernels/: a GGUF model on CPU with its block kernels and float32
activations, as --dtype auto and --dtype float32 give it).

At one row, the default model's decode step ran ~300 kernel calls of a few microseconds each, and the
Python around each (module calls, dispatch checks, argument conversion) cost more than the call: about
4 ms of a 10.7 ms step on the Zen 4 VM (benchmarks/RESULTS.md). So the first decode step of n rows
(n <= MAX_ROWS) runs eagerly with every kernel call recorded. The calls' pointers address static input
buffers, the weights, the KV caches, and the intermediate tensors the capture allocated, which are kept.
Later decode steps of n rows copy their inputs into the static buffers and replay the calls: one ctypes
call per kernel and nothing else.

Safety, as for CUDA graphs: the capture runs under a torch function mode that refuses every torch call
other than allocations, views and metadata (a replay would skip an op that computes in torch), and the
first replay must give the capture's output bit for bit. A refusal or a mismatch turns the graphs off
(logged), and that step and all later ones run eagerly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from engine.attention import AttentionMetadata, StaticDecodeInputs
from engine.kernels import cpu_quant

logger = logging.getLogger(__name__)

# Decode steps of up to this many rows replay graphs; bigger ones run eagerly, where the ops' Python cost
# is small beside their arithmetic. One graph per row count seen, captured on first use.
MAX_ROWS = 16

# Torch functions that allocate: their outputs are kept alive with the graph (the recorded pointers
# address them); their contents are whatever the kernels write.
_ALLOCATIONS = {"empty", "empty_like", "new_empty"}
# Torch functions whose non-tensor results are metadata, never read from a tensor's contents.
_METADATA = {
    "data_ptr",
    "stride",
    "size",
    "dim",
    "numel",
    "element_size",
    "is_contiguous",
    "untyped_storage",
    "__len__",
    "__get__",  # properties: shape, dtype, device, is_cuda, ndim, ...
}


class NotCapturable(RuntimeError):
    """The step ran a torch op that computes, which a replay of the kernel calls would skip."""


class _KernelsOnly(TorchFunctionMode):
    """Lets allocations, views and metadata through (keeping what is allocated) and raises on anything that
    computes: a tensor result that is not a view of an input, an in-place method, an `out=` argument, or a
    Python value read from a tensor (`item`, `tolist`, `bool`). A function mode, not a dispatch mode: the
    latter imports torch._dynamo on first use (1.1 s on the Zen 4 VM, paid by the first decode step)."""

    def __init__(self, kept: list[Tensor]) -> None:
        super().__init__()
        self.kept = kept

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if (name.endswith("_") and not name.endswith("__")) or "out" in kwargs:
            raise NotCapturable(f"{name} writes into a tensor in torch")
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if name in _ALLOCATIONS:
            self.kept.extend(outputs)
            return out
        if not outputs:
            if name not in _METADATA:
                raise NotCapturable(f"{name} reads a tensor's contents in torch")
            return out
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)
        }
        if not all(t.untyped_storage().data_ptr() in inputs for t in outputs):
            raise NotCapturable(f"{name} computes in torch")
        return out


class CpuDecodeGraphs:
    """Recorded decode steps by row count; `run` replays (capturing on first use) or returns None, and the
    caller then runs the model eagerly."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[Tensor],
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_rows = min(max_num_seqs, MAX_ROWS)
        # Static buffers the recorded calls read; each run copies the real batch into their leading rows.
        self.embeds = torch.zeros(self.max_rows, hidden_size, dtype=dtype)
        self.inputs = StaticDecodeInputs(self.max_rows, max_model_len, block_size, torch.device("cpu"))
        self.calls: dict[int, list[tuple[Any, tuple[Any, ...]]]] = {}
        self.outputs: dict[int, Tensor] = {}
        self.kept: dict[int, list[Tensor]] = {}
        self.enabled = True

    def can_run(self, meta: AttentionMetadata, has_embeds: bool) -> bool:
        return (
            self.enabled
            and not has_embeds
            and meta.max_query_len == 1
            and meta.num_seqs <= self.max_rows
            and meta.max_seq_len <= self.inputs.max_model_len
        )

    def run(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor | None:
        """Final hidden states [n, H] of a decode-only batch of n <= max_rows rows (can_run said so), or
        None when this step must run eagerly."""
        n = self.inputs.load(positions, meta)
        self.embeds[:n].copy_(self.model.embed_input_ids(input_ids))  # type: ignore[operator]
        if n in self.calls:
            cpu_quant.replay(self.calls[n])
            return self.outputs[n]
        return self._capture(n)

    def _capture(self, n: int) -> Tensor | None:
        kept: list[Tensor] = []
        try:
            with _KernelsOnly(kept), cpu_quant.recording() as calls:
                out = self.model(
                    self.inputs.positions[:n],  # the input ids: unread beside inputs_embeds
                    self.inputs.positions[:n],
                    self.kv_caches,
                    self.inputs.meta(n),
                    inputs_embeds=self.embeds[:n],
                )
        except NotCapturable as exc:
            logger.info("decode steps run eagerly on CPU: %s", exc)
            self.enabled = False
            return None
        expected = out.clone()
        cpu_quant.replay(calls)  # writes the same K/V to the same slots again: harmless
        if not torch.equal(out, expected):
            logger.warning("a replayed CPU decode step differs from its capture; decoding eagerly")
            self.enabled = False
            return expected
        self.calls[n], self.outputs[n], self.kept[n] = calls, out, kept
        logger.debug("captured a CPU decode graph for %d rows (%d kernel calls)", n, len(calls))
        return out
