"""Start-up of LoRA in an engine: check the flags, wrap the model, load the --lora-modules adapters."""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.config import EngineConfig
from engine.lora.adapter import LoraError
from engine.lora.manager import LoraManager
from protocol.messages import LoraAdapter

logger = logging.getLogger(__name__)


def build_lora_manager(model: nn.Module, config: EngineConfig, device: torch.device) -> LoraManager:
    """Wraps the model's projections and loads every --lora-modules adapter; ValueError ends start-up
    with the reason (a bad adapter named on the command line is a mistake to fix, not to skip)."""
    # The workers' shards would run without the adapters (engine/distributed/setup.py refuses it first).
    if config.tensor_parallel_size > 1:
        raise ValueError("LoRA with --tensor-parallel-size > 1 is not supported yet")
    manager = LoraManager(
        model,
        max_loras=config.max_loras,
        max_rank=config.max_lora_rank,
        max_cpu_loras=config.max_cpu_loras or config.max_loras,
        device=device,
    )
    if len(config.lora_modules) > manager.max_cpu_loras:
        # Every start-up adapter is read once to check it; beyond --max-cpu-loras the oldest are
        # dropped from memory again and re-read from their folders when a request names them.
        logger.info(
            "%d --lora-modules, %d held in memory (--max-cpu-loras)",
            len(config.lora_modules),
            manager.max_cpu_loras,
        )
    for name, path, base_model_name in config.lora_modules:
        try:
            manager.load(LoraAdapter(name, path, base_model_name))
        except LoraError as exc:
            raise ValueError(f"--lora-modules {name}={path}: {exc}") from None
    logger.info(
        "LoRA on: %d projections wrapped, %d slots of rank %d, %d adapters loaded",
        len(manager.layers),
        manager.max_loras,
        manager.max_rank,
        len(manager.adapters),
    )
    return manager
