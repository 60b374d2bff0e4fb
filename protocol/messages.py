"""Wire structs: everything that crosses the API-process / engine-core boundary.

Rules (msgspec's): structs are array-like, so field ORDER is the wire format. Add new fields only
at the end and always with a default, so old and new peers keep talking.
"""

from __future__ import annotations

import enum

import msgspec

# 2: SamplingParams.bad_words_token_ids (never set, never read) removed; its slot must not be reused by
# a peer still speaking version 1.
PROTOCOL_VERSION = 2

# Upper bounds of vLLM's `vllm:iteration_tokens_total` histogram (tokens scheduled in one engine step).
# The engine counts steps per bucket and the API process renders them, so both read this one tuple.
ITERATION_TOKENS_BUCKETS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, a stop token id, or (set by the frontend) a stop string
    LENGTH = 1  # max_tokens or max_model_len reached
    ABORT = 2  # cancelled by the client / the frontend
    ERROR = 3  # the engine failed this request


class Wire(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Base for every wire struct."""


class StructuredSpec(Wire):
    """A constraint on the output: exactly one of the fields is set."""

    json_schema: str | None = None  # JSON text of a JSON schema ("{}"-like any-object for json_object)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark / EBNF grammar text
    any_json_object: bool = False


class WireSamplingParams(Wire):
    """Per-request sampling settings as the engine receives them, already validated by the frontend's
    input processor. (The user-facing offline `tandem.SamplingParams` is another class.)"""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k cut
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    structured: StructuredSpec | None = None
    allowed_token_ids: list[int] | None = None


# The name before the rename (engine/ and old tests import it); the encoded form is the same.
SamplingParams = WireSamplingParams


class EmbedSpan(Wire):
    """Prompt positions whose input embeddings come from a raw tensor frame instead of the table."""

    start: int  # first prompt position replaced
    num_tokens: int
    frame_index: int  # index into the message's extra frames
    dtype: str  # numpy-style dtype name of the raw frame ("float32", "bfloat16" as raw uint16, ...)
    digest: str  # content hash of the rows, so prefix caching can key these blocks


class Hello(Wire):
    protocol_version: int
    client_name: str


class Refused(Wire):
    reason: str


class Ready(Wire):
    engine_id: str
    served_model_names: list[str]
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    tokenizer_json: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]
    add_bos_token: bool
    task: str = "generate"  # "generate" or "embed"
    hidden_size: int = 0
    enable_prompt_embeds: bool = False
    model_dtype: str = "float32"
    special_tokens: dict[str, str] = {}  # named special tokens (pad, unk, ...) for templates
    max_waiting_requests: int | None = None
    embedding_dimensions: int | None = None
    # Embedding models trained for Matryoshka truncation: the allowed `dimensions` ([] means any);
    # None means the model does not support truncated embeddings.
    matryoshka_dimensions: list[int] | None = None
    # The model's generation_config.json defaults (--generation-config) for sampling fields a request
    # leaves unset, under the request's field names: temperature, top_p, top_k, min_p,
    # repetition_penalty, max_tokens. Only the fields the file sets.
    default_sampling: dict[str, float] = {}
    enable_prefix_caching: bool = True  # for vllm:cache_config_info
    # --max-logprobs: the most logprobs / prompt_logprobs a request may ask for (-1: the whole vocabulary).
    max_logprobs: int = 20
    enable_lora: bool = False  # --enable-lora: the engine accepts LoadLora / UnloadLora and lora_name
    max_lora_rank: int = 0
    lora_adapters: list[LoraAdapter] = []  # adapters loaded at start-up (--lora-modules) and since
    # --max-num-seqs (0: not announced). With max_waiting_requests it lets an API process refuse at once
    # what the engine would refuse only after its step in progress (frontend/engine_client.py).
    max_num_seqs: int = 0


class LoraAdapter(Wire):
    """A LoRA adapter an engine holds; requests select it by naming it as their `model`."""

    name: str
    path: str  # PEFT folder (adapter_config.json + adapter_model.safetensors) on the engine's host
    base_model_name: str | None = None  # the served name it extends; None: the engine's first served name
    rank: int = 0  # filled in by the engine once loaded


class LoadLora(Wire):
    """API process -> engine: load an adapter at run time (POST /v1/load_lora_adapter)."""

    op_id: str
    adapter: LoraAdapter


class UnloadLora(Wire):
    """API process -> engine: drop an adapter (POST /v1/unload_lora_adapter)."""

    op_id: str
    name: str


class LoraResult(Wire):
    """Engine -> every connected API process after a LoadLora / UnloadLora: the outcome for the asker
    (matched by op_id) and the engine's full adapter list, so every API process learns the change."""

    op_id: str
    engine_id: str
    adapters: list[LoraAdapter]
    error: str | None = None  # None: done
    error_status: int = 400  # HTTP status for the asker when error is set (400 bad adapter, 404 unknown)


class AddRequest(Wire):
    request_id: str
    prompt_token_ids: list[int]
    sampling: WireSamplingParams
    arrival_time: float
    priority: int = 0
    embeds: list[EmbedSpan] = []
    cache_salt: str | None = None
    embed_task: bool = False  # pooled embedding instead of generation
    lora_name: str | None = None  # run under this loaded adapter (None: the base model)


class Abort(Wire):
    request_ids: list[str]


class TokenLogprob(Wire):
    """Logprob of one generated (or prompt) token and the top alternatives at that position."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class RequestDelta(Wire):
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended the request, if any
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only; position 0 is None
    error: str | None = None
    embedding: list[float] | None = None  # embed tasks: the pooled, normalized vector
    num_prompt_tokens: int = 0
    error_status: int | None = None  # HTTP status the frontend should answer with when error is set
    # Seconds between the engine receiving the request and first scheduling it (engine's own clock, so
    # no cross-host skew); sent once, with the first token.
    queue_time_s: float | None = None
    num_preemptions: int = 0  # on the finishing delta: how often the request was preempted


class SchedulerStats(Wire):
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    step: int = 0
    num_scheduled_seqs: int = 0
    num_scheduled_tokens: int = 0
    num_preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative tokens looked up
    prefix_cache_hits: int = 0  # cumulative tokens found
    max_step_num_seqs: int = 0  # largest batch seen so far (a per-step statistic the tests read)
    num_free_blocks: int = 0
    num_bad_messages: int = 0  # undecodable messages dropped since start
    # Waiting requests the scheduler passes over until something else is ready (a grammar still
    # compiling): vLLM's "deferred" reason; the rest of num_waiting wait for capacity.
    num_waiting_deferred: int = 0
    # Steps by tokens scheduled: one count per ITERATION_TOKENS_BUCKETS bound, then one for larger
    # steps (not cumulative); and the tokens of all steps. Cumulative since the engine started.
    iteration_tokens_counts: list[int] = []
    iteration_tokens_sum: int = 0
    # Speculative decoding, cumulative: draft tokens the model checked, and those it agreed with.
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0


class Outputs(Wire):
    engine_id: str
    deltas: list[RequestDelta]
    stats: SchedulerStats | None = None


class Heartbeat(Wire):
    sent_at: float
    stats: SchedulerStats | None = None


class EngineDead(Wire):
    engine_id: str
    message: str
