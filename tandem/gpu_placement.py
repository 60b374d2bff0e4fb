"""Which GPUs each engine of `tandem serve` gets: disjoint ranges, in launch order.

Without this every engine would open `cuda:0` (the engine's `--device auto` means "the first GPU"), so
`--data-parallel-size 2` on a 2-GPU host would put both engines on one device, and two TP=2 engines on an
8-GPU host would share GPUs 0-1. The launcher stays torch-free: it counts GPUs from the NVIDIA driver's
/proc entries, and places only engines whose device is left to it (`auto` or a bare `cuda`); an explicit
`cuda:N` or `cpu` is the user's choice. When the engines need more GPUs than the host has, nothing is
placed (they share, as before) and the caller says so.
"""

from __future__ import annotations

import os

_NVIDIA_GPUS = "/proc/driver/nvidia/gpus"


def count_gpus() -> int:
    """NVIDIA GPUs the driver exposes, limited by CUDA_VISIBLE_DEVICES when that is set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        return len(os.listdir(_NVIDIA_GPUS))
    except OSError:
        return 0


def place_engines(devices: list[str], ranks: list[int], num_gpus: int) -> list[str] | None:
    """The `--device` of each engine, given each one's `--device` flag and tensor-parallel size; None when
    nothing is to be placed (no GPU, every device chosen by the user, or not enough GPUs for all)."""
    placeable = [d in ("auto", "cuda") for d in devices]
    if num_gpus == 0 or not any(placeable):
        return None
    needed = sum(n for n, free in zip(ranks, placeable, strict=True) if free)
    if needed > num_gpus:
        return None
    placed, next_gpu = [], 0
    for device, n, free in zip(devices, ranks, placeable, strict=True):
        if free:
            placed.append(f"cuda:{next_gpu}")  # a TP engine's ranks take cuda:i .. cuda:i+n-1
            next_gpu += n
        else:
            placed.append(device)
    return placed
