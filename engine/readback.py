"""Host <-> device transfers for one engine step without stray synchronizations.

On a GPU every read of a device value (`.tolist()`, `.item()`, `.cpu()`, `if tensor:`) waits for all
queued work, and so does a copy from pageable host memory (`torch.tensor(list, device="cuda")`).
A step therefore sends its small host inputs through pinned memory without waiting, and reads all of
its results back in one copy at the end: sampled ids, logprobs and prompt logprobs together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(
    values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A host list as a tensor on `device`; on a GPU the copy is queued, not waited for."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def tensor_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; on a GPU staged through pinned memory so the copy is queued."""
    if device.type == "cuda" and not host.is_cuda:
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class DeviceReadback:
    """Collects a step's device results and reads them to the host with a single copy.

    `add` registers a tensor (any shape, values exactly representable in float64: token ids, ranks,
    float32 logprobs) and returns a slot; `fetch` copies everything at once; `get(slot)` gives the
    host values as a numpy array of the tensor's shape.
    """

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._host: list[np.ndarray] | None = None

    def add(self, tensor: torch.Tensor) -> int:
        if self._host is not None:
            raise RuntimeError("DeviceReadback.add after fetch")
        self._tensors.append(tensor)
        return len(self._tensors) - 1

    def fetch(self) -> None:
        """The step's one device -> host read."""
        if self._host is not None:
            return
        if not self._tensors:
            self._host = []
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in self._tensors])
        host = flat.cpu().numpy()
        self._host, offset = [], 0
        for t in self._tensors:
            n = t.numel()
            self._host.append(host[offset : offset + n].reshape(t.shape))
            offset += n
        self._tensors = []

    def get(self, slot: int) -> np.ndarray:
        if self._host is None:
            raise RuntimeError("DeviceReadback.get before fetch")
        return self._host[slot]
