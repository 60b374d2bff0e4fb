"""Qwen2 family: the Llama decoder with biases on the q/k/v projections."""

from __future__ import annotations

from dataclasses import replace

from engine.distributed.shard import TensorParallel
from engine.models.config import ModelArchConfig
from engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ModelArchConfig, tp: TensorParallel | None = None) -> None:
        super().__init__(replace(arch, attention_bias=True), tp)
