"""Builds an engine's parts from its config: the model, the KV cache sized to memory, the scheduler, the runner."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from engine.config import DEFAULT_KV_CACHE_MEMORY, DEFAULT_KV_CACHE_TOKENS, EngineConfig
from engine.cpu_threads import StepThreads
from engine.kv_cache import KVCacheManager
from engine.layers.embedding import LMHead
from engine.loader.tokenizer_info import TokenizerInfo, load_chat_template
from engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from engine.scheduler import Scheduler, SchedulerLimits
from protocol.messages import Ready

if TYPE_CHECKING:
    from engine.distributed.shard import TensorParallel
    from engine.distributed.workers import TensorParallelWorkers
    from engine.loader.model_loader import LoadedModel
    from engine.lora.manager import LoraManager
    from engine.models.config import ModelArchConfig
    from engine.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    scheduler: Scheduler
    runner: ModelRunner
    ready: Ready
    vocab_size: int
    hidden_size: int
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_model_len: int
    tp_workers: TensorParallelWorkers | None = None  # ranks 1..N-1 when --tensor-parallel-size > 1
    lora: LoraManager | None = None  # --enable-lora


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _num_kv_blocks(
    config: EngineConfig, bytes_per_block: int, device: torch.device, model_max_len: int
) -> int:
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - total * (1.0 - config.gpu_memory_utilization)
        return max(int(budget // bytes_per_block), 2)
    if config.kv_cache_memory:
        return max(int(config.kv_cache_memory // bytes_per_block), 2)
    # Default: enough blocks for DEFAULT_KV_CACHE_TOKENS (or one full context, plus the null block),
    # never more bytes than DEFAULT_KV_CACHE_MEMORY.
    wanted_tokens = max(DEFAULT_KV_CACHE_TOKENS, (config.max_model_len or model_max_len) + config.block_size)
    wanted_blocks = -(-wanted_tokens // config.block_size)
    return max(min(wanted_blocks, int(DEFAULT_KV_CACHE_MEMORY // bytes_per_block)), 2)


def load_engine_model(config: EngineConfig, device: torch.device, tp: TensorParallel | None) -> LoadedModel:
    """The model as the engine's flags ask for it; with `tp`, one rank's shard (workers call this too)."""
    from engine.loader import load_model  # heavy import, kept out of module import time

    return load_model(
        config.model,
        load_format=config.load_format,
        dtype=config.dtype,
        device=str(device),
        seed=config.seed,
        tp=tp,
        # --cpu-int8-weights replaces the linear layers, blocks and all.
        gguf_cpu_kernels=config.gguf_cpu_kernels and not config.cpu_int8_weights,
    )


def kv_cache_dtype(config: EngineConfig, loaded: LoadedModel, device: torch.device) -> torch.dtype:
    """--kv-cache-dtype for this model; a dtype other than the model's is refused on CUDA, whose Triton
    attention reads the cache in the model's dtype."""
    if config.kv_cache_dtype == "auto":
        return loaded.auto_kv_cache_dtype
    from engine.loader.model_loader import named_dtype

    dtype = named_dtype(config.kv_cache_dtype, "kv_cache_dtype")
    if device.type != "cpu" and dtype != loaded.dtype:
        raise ValueError(
            f"--kv-cache-dtype {config.kv_cache_dtype} differs from the model dtype "
            f"({str(loaded.dtype).removeprefix('torch.')}): supported on CPU only"
        )
    return dtype


def local_num_kv_blocks(
    config: EngineConfig, arch: ModelArchConfig, num_kv_heads: int, dtype: torch.dtype, device: torch.device
) -> int:
    """KV blocks that fit this process's memory, with num_kv_heads heads (a tensor-parallel rank's own)."""
    per_block = kv_cache_bytes_per_block(
        arch.num_hidden_layers, config.block_size, num_kv_heads, arch.head_dim, dtype
    )
    return _num_kv_blocks(config, per_block, device, arch.max_position_embeddings)


def _use_int8_weights(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    if device.type != "cpu" or dtype != torch.bfloat16:
        logger.warning(
            "--cpu-int8-weights applies to bfloat16 models on CPU only; ignored (%s on %s)", dtype, device
        )
        return
    from engine.layers.int8_linear import use_int8_for_small_batches

    num = use_int8_for_small_batches(model)
    logger.info("int8 weight copies for %d linear layers, used by steps of at most 4 rows", num)


def _return_free_heap() -> None:
    """Hands glibc's freed heap pages back to the OS: loading dequantized every tensor, and much of that
    is free now but stays resident otherwise (170 MB of the default model's engine; elsewhere a no-op)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(name).malloc_trim(0)


def _step_threads(model: torch.nn.Module, device: torch.device) -> StepThreads | None:
    """CPU: small steps on one thread (engine/cpu_threads.py); the multiply-adds a row costs are the
    linear layers' and the LM head's weights (one each per row)."""
    if device.type != "cpu":
        return None
    macs = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear | LMHead))
    return StepThreads(macs)


def build_engine_parts(config: EngineConfig) -> EngineParts:

    # Flags that name files are read before the model, so a mistake fails at once.
    chat_template = None if config.chat_template is None else load_chat_template(config.chat_template)
    default_sampling = generation_defaults(config)
    if config.lora_modules and not config.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = pick_device(config.device)
    workers = tp = None
    if config.tensor_parallel_size > 1:
        from engine.distributed.setup import start_tensor_parallel

        workers, tp, device = start_tensor_parallel(config, device)
    loaded = load_engine_model(config, device, tp)
    arch = loaded.arch
    if config.cpu_int8_weights:
        _use_int8_weights(loaded.model, loaded.dtype, device)
    num_kv_heads = loaded.model.num_kv_heads  # this rank's, under tensor parallelism
    kv_dtype = kv_cache_dtype(config, loaded, device)
    lora = None
    if config.enable_lora:
        from engine.lora.setup import build_lora_manager

        lora = build_lora_manager(loaded.model, config, device)
    # Tensor-parallel ranks keep their share of the cores for every step. Read the weights' sizes before
    # the dense copies may be freed below.
    step_threads = _step_threads(loaded.model, device) if workers is None else None
    if lora is None and device.type == "cpu":
        from engine.layers.gguf_packed import release_dense_weights

        if freed := release_dense_weights(loaded.model):
            _return_free_heap()
            logger.info("GGUF blocks serve every step: %.0f MiB of dense weights freed", freed / 2**20)
    per_block = kv_cache_bytes_per_block(
        arch.num_hidden_layers, config.block_size, num_kv_heads, arch.head_dim, kv_dtype
    )
    num_blocks = local_num_kv_blocks(config, arch, num_kv_heads, kv_dtype, device)
    model = loaded.model
    if workers is not None:
        from engine.distributed.setup import tensor_parallel_model

        num_blocks, tp_model = tensor_parallel_model(workers, loaded, num_blocks)
        # Rank 0's stand-in answers the three calls the runner makes (forward, compute_logits,
        # embed_input_ids) and drives the workers through them.
        model = cast("LlamaForCausalLM", tp_model)
    capacity = (num_blocks - 1) * config.block_size
    max_model_len = min(config.max_model_len or arch.max_position_embeddings, capacity)
    if config.max_model_len and config.max_model_len > capacity:
        logger.warning(
            "max_model_len %d exceeds the KV cache (%d tokens); using %d",
            config.max_model_len,
            capacity,
            capacity,
        )
    logger.info(
        "model dtype %s; KV cache: %s, %d blocks of %d tokens (%.1f MiB); max_model_len %d; "
        "at most %.1f sequences of that length at once",
        str(loaded.dtype).removeprefix("torch."),
        str(kv_dtype).removeprefix("torch."),
        num_blocks,
        config.block_size,
        num_blocks * per_block / 2**20,
        max_model_len,
        capacity / max_model_len,
    )
    runner = ModelRunner(
        model,
        arch,
        num_blocks=num_blocks,
        block_size=config.block_size,
        kv_cache_dtype=kv_dtype,
        device=device,
        max_num_seqs=config.max_num_seqs,
        max_model_len=max_model_len,
        # CUDA graphs would freeze the LoRA layers' per-step slot mask: LoRA runs eagerly.
        enforce_eager=config.enforce_eager or config.enable_lora,
        seed=config.seed,
        num_kv_heads=num_kv_heads,
        step_threads=step_threads,
    )
    runner.lora = lora
    limits = SchedulerLimits(
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        max_model_len=max_model_len,
        long_prefill_token_threshold=config.long_prefill_token_threshold,
        priority_policy=config.scheduling_policy == "priority",
        max_loras=config.max_loras if lora is not None else None,
    )
    kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
    scheduler = Scheduler(limits, kv_cache, config.speculative_config)
    tok = loaded.tokenizer
    if chat_template is not None:
        tok = dataclasses.replace(tok, chat_template=chat_template)
        logger.info("chat template: the one given by --chat-template")
    ready = ready_message(
        config,
        tok,
        default_served_name=loaded.default_served_name,
        max_model_len=max_model_len,
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        dtype=loaded.dtype,
        num_kv_blocks=num_blocks,
        enable_prompt_embeds=config.enable_prompt_embeds,
        default_sampling=default_sampling,
        enable_lora=lora is not None,
        max_lora_rank=config.max_lora_rank if lora is not None else 0,
        lora_adapters=list(lora.adapters.values()) if lora is not None else [],
    )
    return EngineParts(
        scheduler=scheduler,
        runner=runner,
        ready=ready,
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        dtype=loaded.dtype,
        eos_token_ids=frozenset(tok.eos_token_ids),
        max_model_len=max_model_len,
        tp_workers=workers,
        lora=lora,
    )


# generation_config.json field -> (request field, what a request may send there, the check).
_GENERATION_FIELDS: dict[str, tuple[str, str, Callable[[float], bool]]] = {
    "temperature": ("temperature", "a number in [0, 2]", lambda v: 0 <= v <= 2),
    "top_p": ("top_p", "a number in (0, 1]", lambda v: 0 < v <= 1),
    "top_k": ("top_k", "an integer >= -1 (-1 and 0: no cut)", lambda v: v >= -1 and v == int(v)),
    "min_p": ("min_p", "a number in [0, 1]", lambda v: 0 <= v <= 1),
    "repetition_penalty": ("repetition_penalty", "a number > 0", lambda v: v > 0),
    "max_new_tokens": ("max_tokens", "an integer >= 1", lambda v: v >= 1 and v == int(v)),
}


def generation_defaults(config: EngineConfig) -> dict[str, float]:
    """--generation-config: sampling defaults from a generation_config.json, as vLLM reads them ("auto":
    the model folder's, if it has one; "vllm": none; else the named folder's, which must have one)."""
    from engine.loader import resolve_model_path

    if config.generation_config == "vllm":
        return {}
    if config.generation_config == "auto":
        path = resolve_model_path(config.model) / "generation_config.json"
        if not path.is_file():
            return {}  # a GGUF file, or a folder without one
    else:
        path = Path(config.generation_config).expanduser() / "generation_config.json"
        if not path.is_file():
            raise ValueError(
                f"--generation-config {config.generation_config!r} names no folder with a "
                f"generation_config.json ({path} is missing)"
            )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    defaults = parse_generation_defaults(raw if isinstance(raw, dict) else {}, str(path))
    if defaults:
        logger.warning(
            "default sampling parameters overridden by %s (the model creator's recommendation): %s; "
            "requests that set a field keep their value. Relaunch with `--generation-config vllm` to "
            "ignore the file.",
            path,
            defaults,
        )
    return defaults


# transformers' GenerationConfig defaults: a file that repeats one says nothing, and vLLM (which reads only
# the fields that differ from these) ignores it, so a `"top_k": 50` does not cut every request to 50 tokens.
_TRANSFORMERS_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def parse_generation_defaults(raw: dict[str, Any], source: str) -> dict[str, float]:
    """The sampling fields a generation_config.json sets, under request field names; other fields, nulls
    and transformers' own defaults are ignored. A value no request could send fails at start-up, not in
    every request."""
    defaults: dict[str, float] = {}
    for name, (field_name, allowed, check) in _GENERATION_FIELDS.items():
        value = raw.get(name)
        if value is None or (name in _TRANSFORMERS_DEFAULTS and value == _TRANSFORMERS_DEFAULTS[name]):
            continue
        is_number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not (is_number and check(value)):
            raise ValueError(
                f"{source}: {name} must be {allowed}, got {value!r}; "
                "fix the file or pass --generation-config vllm to ignore it"
            )
        defaults[field_name] = int(value) if field_name in ("top_k", "max_tokens") else float(value)
    return defaults


def ready_message(
    config: EngineConfig,
    tok: TokenizerInfo,
    *,
    default_served_name: str,
    max_model_len: int,
    vocab_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    **extra: Any,
) -> Ready:
    """The READY handshake: what an API process needs to serve this engine without model files."""
    return Ready(
        engine_id=config.engine_id,
        served_model_names=list(config.served_model_names) or [default_served_name],
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        block_size=config.block_size,
        tokenizer_json=tok.tokenizer_json,
        chat_template=tok.chat_template,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        eos_token_ids=list(tok.eos_token_ids),
        add_bos_token=tok.add_bos_token,
        task=config.task,
        hidden_size=hidden_size,
        model_dtype=str(dtype).removeprefix("torch."),
        special_tokens=dict(tok.special_tokens),
        max_waiting_requests=effective_max_waiting_requests(config, extra.get("num_kv_blocks", 0)),
        enable_prefix_caching=config.enable_prefix_caching,
        max_logprobs=config.max_logprobs,
        max_num_seqs=config.max_num_seqs,
        **extra,
    )


MIN_DEFAULT_WAITING_REQUESTS = 1024


def effective_max_waiting_requests(config: EngineConfig, num_kv_blocks: int) -> int:
    """--max-waiting-requests, or by default a bound from the KV cache: a waiting request needs at least
    one block to start, so more waiting requests than blocks only add latency and memory. The floor
    keeps small caches (and embedding engines, which have none) able to take a large fan-out."""
    if config.max_waiting_requests is not None:
        return config.max_waiting_requests
    return max(MIN_DEFAULT_WAITING_REQUESTS, num_kv_blocks)
