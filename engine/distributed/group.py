"""Joining one engine's process group, and what every rank of it does the same way at start-up."""

from __future__ import annotations

import datetime
import os
import socket
import struct
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

_COUNT = struct.Struct("<q")
_GROUP_TIMEOUT_S = 600.0


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
    """NCCL between GPUs, gloo on CPU. Rank 0's watchdog enforces the step timeout; the group's own
    timeout (gloo raises after it) only backs it up, and must also cover the rendezvous while workers
    import torch, hence at least _GROUP_TIMEOUT_S."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=max(timeout_s, _GROUP_TIMEOUT_S)),
    )


def threads_per_rank(num_threads: int | None, size: int) -> int:
    """--num-threads, else this machine's cores shared by the ranks: more threads than cores in total
    make OpenMP threads wait for each other at every matmul."""
    if num_threads:
        return num_threads
    return max(1, len(os.sched_getaffinity(0)) // size)


def propose_num_blocks(pipe: Connection, num_blocks: int) -> int:
    """A worker: send what fits this rank's memory, receive what every rank will use."""
    pipe.send_bytes(_COUNT.pack(num_blocks))
    return int(_COUNT.unpack(pipe.recv_bytes())[0])


def agree_num_blocks(pipes: list[Connection], num_blocks: int) -> int:
    """Rank 0: the smallest proposal of all ranks, so block ids mean the same everywhere. Over the pipes,
    not a collective: ranks finish loading at different times, and a collective would time out."""
    agreed = min([num_blocks] + [int(_COUNT.unpack(p.recv_bytes())[0]) for p in pipes])
    for pipe in pipes:
        pipe.send_bytes(_COUNT.pack(agreed))
    return agreed
