"""The engine process's one frozen configuration, built from CLI flags in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.spec.config import SpeculativeConfig, parse_speculative_config

DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3  # bytes of KV cache on CPU unless --kv-cache-memory says otherwise
# ...or less: by default the CPU cache holds this many tokens (or one max_model_len, if longer) when that
# takes fewer bytes. For a small model 2 GiB is ~90k tokens, far more than CPU decoding serves at once,
# and all of it stays resident (llama-server's usual -c 32768 is the same number of tokens).
DEFAULT_KV_CACHE_TOKENS = 32768


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct GGUF)
    served_model_names: tuple[str, ...] = ()
    task: str = "generate"  # "generate" or "embed"
    load_format: str = "auto"
    dtype: str = "auto"
    # The KV cache's dtype: "auto" (the model's, but float16 for a GGUF model on CPU that --dtype auto made
    # float32; engine/loader/model_loader.choose_kv_cache_dtype) or float16 / bfloat16 / float32.
    kv_cache_dtype: str = "auto"
    device: str = "auto"  # "auto": cuda when available, else cpu
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    kv_cache_memory: int | None = None  # bytes; CPU default: see DEFAULT_KV_CACHE_TOKENS
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    scheduling_policy: str = "fcfs"  # or "priority"
    long_prefill_token_threshold: int | None = None
    enforce_eager: bool = False
    enable_prompt_embeds: bool = False
    max_waiting_requests: int | None = None
    listen: str = "ipc:///tmp/tandem-engine-0.sock"
    engine_id: str = "engine-0"
    heartbeat_interval_s: float = 1.0
    client_timeout_s: float = 10.0
    curve_keys_dir: str | None = None
    num_threads: int | None = None
    chat_template: str | None = None  # a Jinja file's path or the template itself; None: the model's own
    # Sampling defaults: "auto" (the model folder's generation_config.json), "vllm" (none) or a folder.
    generation_config: str = "auto"
    max_logprobs: int = 20  # vLLM's default; -1 lets requests ask for the whole vocabulary
    # CPU + bfloat16 only: int8 weight copies for steps of a few rows (engine/layers/int8_linear.py).
    cpu_int8_weights: bool = False
    # GGUF on CPU: keep each layer's quantized blocks for steps of few rows (engine/layers/gguf_packed.py).
    gguf_cpu_kernels: bool = True
    # Ranks of this engine (1: no process group, no workers). Rank 0 is the engine process itself.
    tensor_parallel_size: int = 1
    # A tensor-parallel step (or collective) running longer than this means a hung rank: the engine exits.
    tensor_parallel_timeout_s: float = 300.0
    # LoRA (docs/lora.md): adapters as (name, PEFT folder, base model name or None), loaded at start-up.
    enable_lora: bool = False
    lora_modules: tuple[tuple[str, str, str | None], ...] = ()
    max_loras: int = 1  # adapters in one batch (slots of the LoRA layers), vLLM's default
    max_lora_rank: int = 16  # vLLM's default
    max_cpu_loras: int | None = None  # adapters' weights held in memory; None: max_loras
    # --speculative-config (docs/architecture.md, "Speculative decoding"). Also given as vLLM's JSON
    # text or dict (the offline LLM's speculative_config={...}): checked and converted on construction.
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        raw: Any = self.speculative_config
        object.__setattr__(self, "speculative_config", parse_speculative_config(raw))
