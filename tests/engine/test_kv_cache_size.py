"""How many KV-cache blocks a CPU engine allocates: DEFAULT_KV_CACHE_TOKENS worth by default (capped at
DEFAULT_KV_CACHE_MEMORY bytes), exactly what --kv-cache-memory says when given; --kv-cache-dtype."""

from __future__ import annotations

import pytest
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


def test_kv_cache_dtype_flag_sets_the_cache_and_its_size(tiny_model_dir: TinyModelDir) -> None:
    """A float16 cache under a float32 model: half the bytes per block, so twice the blocks in the same
    memory; attention reads it back in float32 and greedy decoding still runs."""
    model = str(tiny_model_dir("llama"))
    memory = 3 * 2**20
    full = build_engine_parts(EngineConfig(model=model, dtype="float32", kv_cache_memory=memory))
    half = build_engine_parts(
        EngineConfig(model=model, dtype="float32", kv_cache_dtype="float16", kv_cache_memory=memory)
    )
    assert full.runner.kv_caches[0].dtype == torch.float32 and half.runner.kv_caches[0].dtype == torch.float16
    assert half.runner.kv_caches[0].shape[1] == 2 * full.runner.kv_caches[0].shape[1]
    from engine.request import Request
    from protocol.messages import SamplingParams

    outputs = []
    for parts in (full, half):
        request = Request("r", b"c", [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=6, temperature=0.0), 0.0)
        parts.scheduler.add_request(request)
        while request.num_output_tokens < 6:
            out = parts.scheduler.schedule()
            parts.scheduler.update_from_output(out, parts.runner.execute(out))
        outputs.append(request.output_token_ids)
    assert outputs[0] == outputs[1]  # a tiny random model's logits are far apart: rounding K/V keeps them


def test_kv_cache_dtype_other_than_the_models_is_refused_on_cuda(tiny_model_dir: TinyModelDir) -> None:
    from engine.engine_setup import kv_cache_dtype
    from engine.loader import load_model

    loaded = load_model(str(tiny_model_dir("llama")), dtype="float32")
    cuda = torch.device("cuda")
    config = EngineConfig(dtype="float32", kv_cache_dtype="float16")
    with pytest.raises(ValueError, match="supported on CPU only"):
        kv_cache_dtype(config, loaded, cuda)
    assert kv_cache_dtype(EngineConfig(kv_cache_dtype="float32"), loaded, cuda) is torch.float32
    assert kv_cache_dtype(EngineConfig(), loaded, CPU) is torch.float32  # auto: a folder keeps its dtype
    with pytest.raises(ValueError, match="not supported"):
        kv_cache_dtype(EngineConfig(kv_cache_dtype="fp8"), loaded, CPU)
