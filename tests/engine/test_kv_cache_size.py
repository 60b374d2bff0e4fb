"""How many KV-cache blocks a CPU engine allocates: DEFAULT_KV_CACHE_TOKENS worth by default (capped at
DEFAULT_KV_CACHE_MEMORY bytes), exactly what --kv-cache-memory says when given."""

from __future__ import annotations

import torch

from engine.config import DEFAULT_KV_CACHE_MEMORY, DEFAULT_KV_CACHE_TOKENS, EngineConfig
from engine.engine_setup import _num_kv_blocks, build_engine_parts
from engine.model_runner import kv_cache_bytes_per_block
from tests.engine.conftest import TinyModelDir

CPU = torch.device("cpu")


def test_default_cpu_cache_holds_the_default_tokens(tiny_model_dir: TinyModelDir) -> None:
    parts = build_engine_parts(EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32"))
    num_blocks = parts.runner.kv_caches[0].shape[1]
    assert num_blocks * 16 == DEFAULT_KV_CACHE_TOKENS  # the tiny model's context (256) is shorter
    assert parts.ready.num_kv_blocks == num_blocks  # what the API processes are told


def test_kv_cache_memory_flag_sets_the_bytes(tiny_model_dir: TinyModelDir) -> None:
    config = EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", kv_cache_memory=3 * 2**20)
    parts = build_engine_parts(config)
    arch = parts.runner.arch
    per_block = kv_cache_bytes_per_block(
        arch.num_hidden_layers, 16, arch.num_key_value_heads, arch.head_dim, torch.float32
    )
    assert parts.runner.kv_caches[0].shape[1] == 3 * 2**20 // per_block


def test_default_covers_one_long_context_and_is_capped_in_bytes() -> None:
    # A context longer than the default token count: room for all of it plus the null block.
    assert _num_kv_blocks(EngineConfig(max_model_len=65536), 1024, CPU, 8192) == 65536 // 16 + 1
    assert _num_kv_blocks(EngineConfig(), 1024, CPU, 131072) == 131072 // 16 + 1  # the model's own length
    # A big model: the byte cap wins over the token count.
    per_block = 8 * 2**20
    assert _num_kv_blocks(EngineConfig(), per_block, CPU, 8192) == DEFAULT_KV_CACHE_MEMORY // per_block
