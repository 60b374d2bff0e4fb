"""Turn a validated OpenAI request into the engine's `SamplingParams`: defaults, length budget, vocab checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from frontend.errors import invalid_request
from frontend.schemas import ChatCompletionRequest, CompletionRequest, StructuredOutputs
from frontend.schemas.checks import MAX_LOGPROBS
from frontend.structured_check import check_structured_spec, spec_param
from protocol.messages import StructuredSpec, WireSamplingParams

_json_encoder = msgspec.json.Encoder()


def build_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    *,
    num_prompt_tokens: int,
    max_model_len: int,
    vocab_size: int,
    eos_token_ids: list[int],
    default_max_tokens: int | None = None,
    structured_override: StructuredSpec | None = None,
    model_defaults: Mapping[str, float] | None = None,
    max_logprobs: int = MAX_LOGPROBS,
) -> WireSamplingParams:
    """Sampling settings for one request whose prompt is `num_prompt_tokens` long.

    `default_max_tokens` applies when the request names no limit (OpenAI's legacy completions use 16);
    None means all the room left in the context. `structured_override` is the hook for tool calling:
    a constraint the caller derived from `tools`/`tool_choice`, which may not be combined with another.
    `model_defaults` (the model's generation_config.json, READY's `default_sampling`) replaces the API
    defaults of temperature, top_p, top_k, min_p and repetition_penalty for fields the request leaves
    unset; its max_tokens (max_new_tokens) caps every request's length, as vLLM applies it.
    `max_logprobs` is the server's --max-logprobs (-1: the whole vocabulary).
    """
    defaults = model_defaults or {}
    is_chat = isinstance(req, ChatCompletionRequest)
    max_tokens = _max_tokens(req, num_prompt_tokens, max_model_len, default_max_tokens, is_chat=is_chat)
    if "max_tokens" in defaults:
        max_tokens = min(max_tokens, int(defaults["max_tokens"]))
    if req.min_tokens is not None and req.min_tokens > max_tokens:
        raise invalid_request(
            f"`min_tokens` ({req.min_tokens}) exceeds the {max_tokens} tokens this request can generate.",
            "min_tokens",
        )
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        logprobs_param = "top_logprobs"
    else:
        logprobs = req.logprobs
        logprobs_param = "logprobs"
    logprobs = resolve_logprobs(logprobs, logprobs_param, "sample", vocab_size, max_logprobs)
    prompt_logprobs = resolve_logprobs(
        req.prompt_logprobs, "prompt_logprobs", "prompt", vocab_size, max_logprobs
    )
    structured = structured_spec(req)
    if structured_override is not None:
        if structured is not None:
            raise invalid_request(
                "Tool calling cannot be combined with another output constraint.", "tool_choice"
            )
        structured = structured_override
    if structured is not None:
        check_structured_spec(structured, spec_param(req))
    return WireSamplingParams(
        max_tokens=max_tokens,
        temperature=_or(req.temperature, defaults.get("temperature", 1.0)),
        top_p=_or(req.top_p, defaults.get("top_p", 1.0)),
        top_k=_top_k(_or(req.top_k, defaults.get("top_k"))),
        min_p=_or(req.min_p, defaults.get("min_p", 0.0)),
        presence_penalty=_or(req.presence_penalty, 0.0),
        frequency_penalty=_or(req.frequency_penalty, 0.0),
        repetition_penalty=_or(req.repetition_penalty, defaults.get("repetition_penalty", 1.0)),
        seed=req.seed,
        min_tokens=_or(req.min_tokens, 0),
        stop_token_ids=_stop_token_ids(req, vocab_size, eos_token_ids),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        structured=structured,
        allowed_token_ids=_in_vocab(req.allowed_token_ids, vocab_size, "allowed_token_ids"),
    )


def resolve_logprobs(
    count: int | None, param: str, kind: str, vocab_size: int, max_logprobs: int
) -> int | None:
    """A requested number of logprobs with -1 ("all") made the vocabulary size; 400 past the server's
    --max-logprobs (whose -1 also means the vocabulary), with vLLM's wording."""
    if count is None:
        return None
    limit = vocab_size if max_logprobs == -1 else max_logprobs
    wanted = vocab_size if count == -1 else count
    if wanted > limit:
        raise invalid_request(
            f"Requested {kind} logprobs of {wanted}, which is greater than max allowed: {limit}.", param
        )
    return min(wanted, vocab_size)


def check_prompt_token_ids(prompt_token_ids: list[int], *, vocab_size: int, param: str = "prompt") -> None:
    """Prompts given as token ids must index the vocabulary (the schema only checked they are >= 0)."""
    _in_vocab(prompt_token_ids, vocab_size, param)


def structured_spec(req: ChatCompletionRequest | CompletionRequest) -> StructuredSpec | None:
    """The output constraint the request asks for, from whichever of its three spellings it used."""
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        return StructuredSpec(any_json_object=True)
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        if fmt.json_schema.schema is None:
            return StructuredSpec(any_json_object=True)
        return StructuredSpec(json_schema=_schema_text(fmt.json_schema.schema))
    if req.structured_outputs is not None:
        return _from_structured_outputs(req.structured_outputs)
    if req.guided_json is not None:
        return StructuredSpec(json_schema=_schema_text(req.guided_json))
    if req.guided_regex is not None:
        return StructuredSpec(regex=req.guided_regex)
    if req.guided_choice is not None:
        return StructuredSpec(choice=list(req.guided_choice))
    if req.guided_grammar is not None:
        return StructuredSpec(grammar=req.guided_grammar)
    return None


def _from_structured_outputs(so: StructuredOutputs) -> StructuredSpec:
    if so.json is not None:
        return StructuredSpec(json_schema=_schema_text(so.json))
    if so.regex is not None:
        return StructuredSpec(regex=so.regex)
    if so.choice is not None:
        return StructuredSpec(choice=list(so.choice))
    if so.grammar is not None:
        return StructuredSpec(grammar=so.grammar)
    return StructuredSpec(any_json_object=True)  # json_object: the checks allow nothing else


def _schema_text(schema: str | dict[str, Any] | bool) -> str:
    return schema if isinstance(schema, str) else _json_encoder.encode(schema).decode()


def _max_tokens(
    req: ChatCompletionRequest | CompletionRequest,
    num_prompt_tokens: int,
    max_model_len: int,
    default_max_tokens: int | None,
    *,
    is_chat: bool,
) -> int:
    where = "messages" if is_chat else "prompt"
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens, which leaves no room for the completion. "
            f"Please reduce the length of the {where}.",
            where,
        )
    requested = req.max_completion_tokens if isinstance(req, ChatCompletionRequest) else None
    param = "max_completion_tokens"
    if requested is None:
        requested, param = req.max_tokens, "max_tokens"
    if requested is None:
        return room if default_max_tokens is None else min(default_max_tokens, room)
    if requested > room:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {where}, {requested} in the "
            f"completion). Please reduce the length of the {where} or completion.",
            param,
        )
    return requested


def _stop_token_ids(
    req: ChatCompletionRequest | CompletionRequest, vocab_size: int, eos_token_ids: list[int]
) -> list[int]:
    token_ids = _in_vocab(req.stop_token_ids, vocab_size, "stop_token_ids") or []
    # The engine stops on EOS by itself unless ignore_eos; listing it again only grows its stop set.
    skip = set() if req.ignore_eos else set(eos_token_ids)
    return list(dict.fromkeys(t for t in token_ids if t not in skip))


def _logit_bias(logit_bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not logit_bias:
        return None
    parsed = {int(key): bias for key, bias in logit_bias.items()}  # keys checked as ints by the schema
    for token_id in parsed:
        if token_id >= vocab_size:
            raise invalid_request(
                f"`logit_bias` names token id {token_id}, outside the vocabulary (size {vocab_size}).",
                "logit_bias",
            )
    return parsed


def _in_vocab(token_ids: list[int] | None, vocab_size: int, param: str) -> list[int] | None:
    if token_ids is None:
        return None
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise invalid_request(
                f"`{param}` holds token id {token_id}, outside the vocabulary (size {vocab_size}).", param
            )
    return list(token_ids)


def _top_k(value: float | None) -> int | None:
    # -1 and 0 both mean "no top-k cut"; the engine only knows None for that.
    return int(value) if value is not None and value > 0 else None


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
