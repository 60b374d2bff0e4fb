"""`--dtype auto` and `--kv-cache-dtype auto`: which dtypes each kind of model gets on each device."""

from __future__ import annotations

import torch

from engine.loader.model_loader import _choose_dtype, choose_kv_cache_dtype, cpu_has_native_bf16
from engine.models.config import ModelArchConfig


def _arch(torch_dtype: str) -> ModelArchConfig:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "torch_dtype": torch_dtype,
    }
    return ModelArchConfig.from_hf_config(config)


def test_gguf_on_cpu_is_float16_on_avx512_bf16_cpus_else_float32() -> None:
    # Not bf16 even where the CPU computes it natively: it misses issue 14's fidelity bound.
    expected = torch.float16 if cpu_has_native_bf16() else torch.float32
    assert _choose_dtype("auto", _arch("float32"), True, "cpu") is expected


def test_gguf_on_gpu_is_bf16_and_folders_keep_their_config_dtype() -> None:
    assert _choose_dtype("auto", _arch("float32"), True, "cuda") is torch.bfloat16
    assert _choose_dtype("auto", _arch("bfloat16"), False, "cpu") is torch.bfloat16
    assert _choose_dtype("auto", _arch("float32"), False, "cpu") is torch.float32
    assert _choose_dtype("float32", _arch("bfloat16"), True, "cpu") is torch.float32


def test_float32_folders_run_in_bf16_on_gpu_unless_asked() -> None:
    assert _choose_dtype("auto", _arch("float32"), False, "cuda") is torch.bfloat16
    assert _choose_dtype("auto", _arch("float16"), False, "cuda:0") is torch.float16
    assert _choose_dtype("float32", _arch("float32"), False, "cuda") is torch.float32


def test_cpu_flag_reading_matches_proc_cpuinfo() -> None:
    with open("/proc/cpuinfo") as f:
        text = f.read()
    assert cpu_has_native_bf16() == ("avx512_bf16" in text or "amx_bf16" in text)


def test_gguf_on_cpu_with_block_kernels_is_float32_with_a_float16_cache() -> None:
    # The block kernels read the file's blocks whatever the dtype: float32 was faster and exact.
    assert _choose_dtype("auto", _arch("float32"), True, "cpu", block_kernels=True) is torch.float32
    assert choose_kv_cache_dtype("auto", torch.float32, True, "cpu") is torch.float16
    # An explicit float32 keeps a float32 cache (exact); folders, GPUs and 16-bit models keep their own.
    assert choose_kv_cache_dtype("float32", torch.float32, True, "cpu") is torch.float32
    assert choose_kv_cache_dtype("auto", torch.float32, False, "cpu") is torch.float32
    assert choose_kv_cache_dtype("auto", torch.bfloat16, True, "cuda") is torch.bfloat16
    assert choose_kv_cache_dtype("auto", torch.float16, True, "cpu") is torch.float16
