"""Start-up of a tensor-parallel engine on rank 0: refuse what is not supported, start the workers,
and wrap rank 0's shard so the model runner drives all ranks."""

from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig
from engine.distributed.channel import CommandChannel
from engine.distributed.driver import TensorParallelModel
from engine.distributed.group import agree_num_blocks, rank_device, threads_per_rank
from engine.distributed.shard import TensorParallel, check_shardable
from engine.distributed.workers import TensorParallelWorkers
from engine.loader.model_loader import LoadedModel, read_arch_config

logger = logging.getLogger(__name__)


def check_tensor_parallel(config: EngineConfig, device: torch.device) -> None:
    """ValueError for combinations that would otherwise fail later or give wrong output."""
    size = config.tensor_parallel_size
    if config.cpu_int8_weights:
        raise ValueError("--cpu-int8-weights cannot be combined with --tensor-parallel-size > 1")
    # LoRA wraps rank 0's projections only: the workers' shards would run without the adapters.
    if config.enable_lora:
        raise ValueError("--enable-lora cannot be combined with --tensor-parallel-size > 1 yet")
    if device.type == "cuda":
        if not config.enforce_eager:
            # CUDA graphs capture collectives only with NCCL graph support, untested here: refuse rather
            # than risk a wrong replay.
            raise ValueError("--tensor-parallel-size > 1 on CUDA needs --enforce-eager (no CUDA graphs yet)")
        needed = (device.index or 0) + size
        if torch.cuda.device_count() < needed:
            raise ValueError(
                f"--tensor-parallel-size {size} needs {needed} GPUs from {device}; "
                f"{torch.cuda.device_count()} are visible"
            )
    elif device.type != "cpu":
        raise ValueError(f"tensor parallelism runs on CUDA (NCCL) or CPU (gloo), not {device.type}")
    arch = read_arch_config(config.model)
    check_shardable(
        size,
        num_heads=arch.num_attention_heads,
        num_kv_heads=arch.num_key_value_heads,
        intermediate_size=arch.intermediate_size,
        vocab_size=arch.vocab_size,
    )


def start_tensor_parallel(
    config: EngineConfig, device: torch.device
) -> tuple[TensorParallelWorkers, TensorParallel, torch.device]:
    """(workers, rank 0's shard, rank 0's device). Returns once every rank has joined the group."""
    check_tensor_parallel(config, device)
    torch.set_num_threads(threads_per_rank(config.num_threads, config.tensor_parallel_size))
    device = rank_device(device, 0)
    workers = TensorParallelWorkers(config, device)
    workers.start()
    return workers, TensorParallel(0, config.tensor_parallel_size), device


def tensor_parallel_model(
    workers: TensorParallelWorkers, loaded: LoadedModel, num_blocks: int
) -> tuple[int, TensorParallelModel]:
    """(KV blocks every rank can hold, rank 0's stand-in model). The workers loaded their shards
    meanwhile and are waiting in the same block agreement."""
    with workers.collective("start-up", timed=False):
        num_blocks = agree_num_blocks(workers.pipes, num_blocks)
    channel = CommandChannel(workers.device, loaded.dtype, loaded.arch.hidden_size, workers.pipes)
    workers.channel = channel
    return num_blocks, TensorParallelModel(loaded.model, workers, channel)
