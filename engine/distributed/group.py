"""Joining one engine's process group, and what every rank of it does the same way at start-up."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the group's rendezvous (ranks of one engine share one host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on the r-th GPU after the engine's own (cuda -> cuda:0, cuda:0 + r); CPU ranks share."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def join_group(rank: int, size: int, port: int, device: torch.device, timeout_s: float) -> None:
    """NCCL between GPUs, gloo on CPU. The timeout bounds every collective (gloo raises after it)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def threads_per_rank(num_threads: int | None, size: int) -> int:
    """--num-threads, else this machine's cores shared by the ranks: more threads than cores in total
    make OpenMP threads wait for each other at every matmul."""
    if num_threads:
        return num_threads
    return max(1, len(os.sched_getaffinity(0)) // size)


def agree_num_blocks(num_blocks: int, device: torch.device) -> int:
    """Every rank proposes what fits its memory; all use the smallest, so block ids mean the same on all."""
    value = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
