"""Sampling settings of one request, independent of how it arrived (`SamplingRequest`), and their one
validation into the engine's `WireSamplingParams`: ranges, defaults, length budget, vocabulary checks.

Both the HTTP bodies (`frontend.schemas.to_sampling.from_openai`) and the offline `tandem.SamplingParams`
become a `SamplingRequest` first, so a setting means the same offline and over HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from frontend.errors import invalid_request
from frontend.structured_check import GrammarDryRun, check_structured_spec
from protocol.messages import StructuredSpec, WireSamplingParams

MAX_N = 128  # a sane cap: each choice is a separate sequence in the engine
MAX_LOGPROBS = 20  # OpenAI's and vLLM's default cap on top logprobs (--max-logprobs)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(slots=True)
class SamplingRequest:
    """What a user asked of sampling and output for one request; None leaves a field to the defaults
    (the model's generation config, then the API's). The `*_param` fields are the request fields that
    error messages name, which differ between chat, completions and the offline API."""

    n: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    min_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured: StructuredSpec | None = None
    max_tokens_param: str = "max_tokens"
    logprobs_param: str = "logprobs"
    structured_param: str = "structured_outputs"
    prompt_param: str = "prompt"  # "messages" for chat: where a too-long prompt came from


def check_sampling_request(sr: SamplingRequest) -> None:
    """The checks that need no model: ranges and consistency, each 400 naming its field."""
    check_range(sr.n, "n", 1, MAX_N)
    check_at_least(sr.max_tokens, sr.max_tokens_param, 1)
    # OpenAI caps temperature at 2; higher values only produce noise.
    check_range(sr.temperature, "temperature", 0.0, 2.0)
    check_range(sr.top_p, "top_p", 0.0, 1.0, low_open=True)
    # -1 and 0 both mean "no top-k" (vLLM's convention).
    check_at_least(sr.top_k, "top_k", -1)
    check_range(sr.min_p, "min_p", 0.0, 1.0)
    check_range(sr.presence_penalty, "presence_penalty", -2.0, 2.0)
    check_range(sr.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    if sr.repetition_penalty is not None and sr.repetition_penalty <= 0:
        raise invalid_request(
            f"`repetition_penalty` must be greater than 0, got {sr.repetition_penalty}.",
            "repetition_penalty",
        )
    for token_id, bias in (sr.logit_bias or {}).items():
        if token_id < 0:
            raise invalid_request(f"`logit_bias` has a negative token id {token_id}.", "logit_bias")
        if not -100.0 <= bias <= 100.0:
            raise invalid_request(
                f"`logit_bias` values must be in [-100, 100], got {bias} for token {token_id}.", "logit_bias"
            )
    check_range(sr.seed, "seed", INT64_MIN, INT64_MAX)
    # An empty stop string would match before any text, ending every request at once.
    if "" in sr.stop:
        raise invalid_request("`stop` must not contain an empty string.", "stop")
    _check_token_ids(sr.stop_token_ids, "stop_token_ids", allow_empty=True)
    _check_token_ids(sr.allowed_token_ids, "allowed_token_ids", allow_empty=False)
    if sr.min_tokens is not None:
        check_at_least(sr.min_tokens, "min_tokens", 0)
        if sr.max_tokens is not None and sr.min_tokens > sr.max_tokens:
            raise invalid_request(
                f"`min_tokens` ({sr.min_tokens}) must not exceed `{sr.max_tokens_param}` ({sr.max_tokens}).",
                "min_tokens",
            )
    # The upper bounds are the server's --max-logprobs, checked with the model's vocabulary at hand.
    check_logprob_count(sr.prompt_logprobs, "prompt_logprobs")
    check_logprob_count(sr.logprobs, sr.logprobs_param)


def check_range(value: float | None, param: str, low: float, high: float, *, low_open: bool = False) -> None:
    if value is None:
        return
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise invalid_request(
            f"`{param}` must be in {bracket}{_number(low)}, {_number(high)}], got {value}.", param
        )


def _number(value: float) -> str:
    """Bounds as people write them: 0 and 2, not 0.0 and 2.0."""
    return str(int(value)) if float(value).is_integer() else str(value)


def check_at_least(value: int | None, param: str, low: int) -> None:
    if value is not None and value < low:
        raise invalid_request(f"`{param}` must be at least {low}, got {value}.", param)


def check_logprob_count(value: int | None, param: str) -> None:
    """vLLM's rule: a count of logprobs is at least 0, or -1 for the whole vocabulary."""
    if value is not None and value < 0 and value != -1:
        raise invalid_request(f"`{param}` must be -1 (all) or at least 0, got {value}.", param)


def _check_token_ids(token_ids: list[int] | None, param: str, *, allow_empty: bool) -> None:
    if token_ids is None:
        return
    if not token_ids and not allow_empty:
        raise invalid_request(f"`{param}` must not be empty.", param)
    for token_id in token_ids:
        if token_id < 0:
            raise invalid_request(f"`{param}` must hold token ids >= 0, got {token_id}.", param)


def build_sampling_params(
    req: SamplingRequest,
    *,
    num_prompt_tokens: int,
    max_model_len: int,
    vocab_size: int,
    eos_token_ids: list[int],
    default_max_tokens: int | None = None,
    structured_override: StructuredSpec | None = None,
    model_defaults: Mapping[str, float] | None = None,
    max_logprobs: int = MAX_LOGPROBS,
    grammar_dry_run: GrammarDryRun | None = None,
) -> WireSamplingParams:
    """Sampling settings for one request whose prompt is `num_prompt_tokens` long.

    `default_max_tokens` applies when the request names no limit (OpenAI's legacy completions use 16);
    None means all the room left in the context. `structured_override` is the hook for tool calling:
    a constraint the caller derived from `tools`/`tool_choice`, which may not be combined with another.
    `model_defaults` (the model's generation_config.json, READY's `default_sampling`) replaces the API
    defaults of temperature, top_p, top_k, min_p and repetition_penalty for fields the request leaves
    unset; its max_tokens (max_new_tokens) caps every request's length, as vLLM applies it.
    `max_logprobs` is the server's --max-logprobs (-1: the whole vocabulary). `grammar_dry_run` also
    tries an output constraint's first tokens against the model's tokenizer.
    """
    defaults = model_defaults or {}
    max_tokens = _max_tokens(req, num_prompt_tokens, max_model_len, default_max_tokens)
    if "max_tokens" in defaults:
        max_tokens = min(max_tokens, int(defaults["max_tokens"]))
    if req.min_tokens is not None and req.min_tokens > max_tokens:
        raise invalid_request(
            f"`min_tokens` ({req.min_tokens}) exceeds the {max_tokens} tokens this request can generate.",
            "min_tokens",
        )
    logprobs = resolve_logprobs(req.logprobs, req.logprobs_param, "sample", vocab_size, max_logprobs)
    prompt_logprobs = resolve_logprobs(
        req.prompt_logprobs, "prompt_logprobs", "prompt", vocab_size, max_logprobs
    )
    structured = req.structured
    if structured_override is not None:
        if structured is not None:
            raise invalid_request(
                "Tool calling cannot be combined with another output constraint.", "tool_choice"
            )
        structured = structured_override
    if structured is not None:
        check_structured_spec(structured, structured_param(req), grammar_dry_run)
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
    """Prompts given as token ids must be non-empty and index the vocabulary (an HTTP body's schema
    only checked they are >= 0)."""
    if not prompt_token_ids:
        raise invalid_request(f"`{param}` must not be empty.", param)
    _in_vocab(prompt_token_ids, vocab_size, param)


def structured_param(req: SamplingRequest) -> str:
    """The request field that carried the constraint, for the error's `param` ("tool_choice": none
    did, so the constraint came from the tools)."""
    return req.structured_param if req.structured is not None else "tool_choice"


def _max_tokens(
    req: SamplingRequest, num_prompt_tokens: int, max_model_len: int, default_max_tokens: int | None
) -> int:
    where = req.prompt_param
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens, which leaves no room for the completion. "
            f"Please reduce the length of the {where}.",
            where,
        )
    requested, param = req.max_tokens, req.max_tokens_param
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


def _stop_token_ids(req: SamplingRequest, vocab_size: int, eos_token_ids: list[int]) -> list[int]:
    token_ids = _in_vocab(req.stop_token_ids, vocab_size, "stop_token_ids") or []
    # The engine stops on EOS by itself unless ignore_eos; listing it again only grows its stop set.
    skip = set() if req.ignore_eos else set(eos_token_ids)
    return list(dict.fromkeys(t for t in token_ids if t not in skip))


def _logit_bias(logit_bias: dict[int, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not logit_bias:
        return None
    for token_id in logit_bias:
        if token_id >= vocab_size:
            raise invalid_request(
                f"`logit_bias` names token id {token_id}, outside the vocabulary (size {vocab_size}).",
                "logit_bias",
            )
    return dict(logit_bias)


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
