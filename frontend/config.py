"""The API process's one frozen configuration, built from CLI flags in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FrontendConfig:
    engine_addresses: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    fd: int | None = None  # an already-bound listening socket handed over by the launcher
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ()  # overrides the names engines announce
    max_request_body_bytes: int = 64 * 1024 * 1024
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    disable_log_requests: bool = False
    max_prompt_embeds_bytes: int = 32 * 1024 * 1024
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    max_tool_argument_chars: int | None = 1000  # maxLength for open strings of forced calls; None: open
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info (vLLM's flag of the same name)
    retry_after_s: int = 1
    shutdown_timeout_s: float = 30.0
    engine_ready_timeout_s: float = 900.0
    heartbeat_interval_s: float = 1.0
    engine_dead_after_s: float = 5.0
    curve_keys_dir: str | None = None
    log_level: str = "info"
    # Shared folder for multi-process Prometheus metrics. prometheus_client itself reads the
    # PROMETHEUS_MULTIPROC_DIR environment variable when a metric is created, so the launcher sets that
    # variable and this field is built from it (tandem/args.py); the frontend reads only this field.
    metrics_dir: str | None = None
    ssl_certfile: str | None = None  # HTTPS when set
    ssl_keyfile: str | None = None
    root_path: str = ""  # the prefix a proxy serves the API under
    # Engine requests one API request may fan out into (completion prompts x n, batch conversations).
    max_batch_size: int = 1024
    allow_credentials: bool = False  # CORS credentials, only ever with an explicit origin list
    lora_timeout_s: float = 120.0  # how long /v1/load_lora_adapter waits for the engines' answers
