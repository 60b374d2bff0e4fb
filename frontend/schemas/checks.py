"""Range and consistency checks of decoded requests, one by one, each error naming its field."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from frontend.errors import APIError, invalid_request
from frontend.schemas.requests import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

MAX_N = 128  # a sane cap: each choice is a separate sequence in the engine
MAX_LOGPROBS = 20  # OpenAI's and vLLM's default cap on top logprobs (--max-logprobs)
TRUNCATION_SIDES = ("left", "right")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,19}")
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
RESPONSE_FORMAT_TYPES = frozenset({"text", "json_object", "json_schema"})
UNSUPPORTED_PART_TYPES = {
    "image_url": "image",
    "image": "image",
    "input_image": "image",
    "image_pil": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "video_url": "video",
    "file": "file",
}


def _check_range(value: float | None, param: str, low: float, high: float, *, low_open: bool = False) -> None:
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


def _check_at_least(value: int | None, param: str, low: int) -> None:
    if value is not None and value < low:
        raise invalid_request(f"`{param}` must be at least {low}, got {value}.", param)


def _check_sampling(req: SamplingFields, *, max_tokens_param: str, max_tokens: int | None) -> None:
    _check_range(req.n, "n", 1, MAX_N)
    _check_at_least(max_tokens, max_tokens_param, 1)
    # OpenAI caps temperature at 2; higher values only produce noise.
    _check_range(req.temperature, "temperature", 0.0, 2.0)
    _check_range(req.top_p, "top_p", 0.0, 1.0, low_open=True)
    # -1 and 0 both mean "no top-k" (vLLM's convention).
    _check_at_least(req.top_k, "top_k", -1)
    _check_range(req.min_p, "min_p", 0.0, 1.0)
    _check_range(req.presence_penalty, "presence_penalty", -2.0, 2.0)
    _check_range(req.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    if req.repetition_penalty is not None and req.repetition_penalty <= 0:
        raise invalid_request(
            f"`repetition_penalty` must be greater than 0, got {req.repetition_penalty}.",
            "repetition_penalty",
        )
    _check_logit_bias(req.logit_bias)
    _check_range(req.seed, "seed", INT64_MIN, INT64_MAX)
    _check_stop(req.stop)
    _check_token_ids(req.stop_token_ids, "stop_token_ids", allow_empty=True)
    _check_token_ids(req.allowed_token_ids, "allowed_token_ids", allow_empty=False)
    if req.min_tokens is not None:
        _check_at_least(req.min_tokens, "min_tokens", 0)
        if max_tokens is not None and req.min_tokens > max_tokens:
            raise invalid_request(
                f"`min_tokens` ({req.min_tokens}) must not exceed `{max_tokens_param}` ({max_tokens}).",
                "min_tokens",
            )
    # The upper bound is the server's --max-logprobs, checked with the model's vocabulary at hand.
    _check_logprob_count(req.prompt_logprobs, "prompt_logprobs")
    if req.prompt_logprobs is not None and req.stream:
        raise invalid_request("`prompt_logprobs` is not available when `stream` is true.", "prompt_logprobs")
    if req.stream_options is not None and not req.stream:
        raise invalid_request("`stream_options` can only be set when `stream` is true.", "stream_options")
    if req.use_beam_search:
        raise invalid_request("Beam search is not supported.", "use_beam_search")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid_request("`best_of` different from `n` is not supported.", "best_of")
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens != -1:
        _check_at_least(req.truncate_prompt_tokens, "truncate_prompt_tokens", 1)
    if req.truncation_side is not None and req.truncation_side not in TRUNCATION_SIDES:
        raise invalid_request(
            f"`truncation_side` must be 'left' or 'right', got {req.truncation_side!r}.", "truncation_side"
        )
    _check_structured(req)


def _check_logprob_count(value: int | None, param: str) -> None:
    """vLLM's rule: a count of logprobs is at least 0, or -1 for the whole vocabulary."""
    if value is not None and value < 0 and value != -1:
        raise invalid_request(f"`{param}` must be -1 (all) or at least 0, got {value}.", param)


def _check_logit_bias(logit_bias: dict[str, float] | None) -> None:
    for key, bias in (logit_bias or {}).items():
        # Strictly ASCII digits: int() would also take " 1", "1_0" and other scripts' digits ("١").
        if _TOKEN_ID_KEY.fullmatch(key) is None:
            raise invalid_request(f"`logit_bias` keys must be token ids, got {key[:40]!r}.", "logit_bias")
        token_id = int(key)
        if token_id < 0:
            raise invalid_request(f"`logit_bias` has a negative token id {token_id}.", "logit_bias")
        if not -100.0 <= bias <= 100.0:
            raise invalid_request(
                f"`logit_bias` values must be in [-100, 100], got {bias} for token {key}.", "logit_bias"
            )


def _check_stop(stop: str | list[str] | None) -> None:
    if stop is None:
        return
    # An empty stop string would match before any text, ending every request at once.
    if stop == "" or (isinstance(stop, list) and "" in stop):
        raise invalid_request("`stop` must not contain an empty string.", "stop")


def _check_token_ids(token_ids: list[int] | None, param: str, *, allow_empty: bool) -> None:
    if token_ids is None:
        return
    if not token_ids and not allow_empty:
        raise invalid_request(f"`{param}` must not be empty.", param)
    for token_id in token_ids:
        if token_id < 0:
            raise invalid_request(f"`{param}` must hold token ids >= 0, got {token_id}.", param)


def _check_structured(req: SamplingFields) -> None:
    given = []
    if req.response_format is not None and req.response_format.type != "text":
        given.append("response_format")
    if req.structured_outputs is not None:
        given.append("structured_outputs")
    guided = {
        "guided_json": req.guided_json,
        "guided_regex": req.guided_regex,
        "guided_choice": req.guided_choice,
        "guided_grammar": req.guided_grammar,
    }
    given += [name for name, value in guided.items() if value is not None]
    if len(given) > 1:
        raise invalid_request(f"Only one output constraint may be given, got {', '.join(given)}.", given[1])
    fmt = req.response_format
    if fmt is not None:
        if fmt.type not in RESPONSE_FORMAT_TYPES:
            raise invalid_request(
                f"`response_format.type` must be one of text, json_object, json_schema; got {fmt.type!r}.",
                "response_format.type",
            )
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise invalid_request(
                "`response_format.json_schema` is required when the type is json_schema.",
                "response_format.json_schema",
            )
    so = req.structured_outputs
    if so is not None:
        set_fields = [
            name for name in ("json", "regex", "choice", "grammar") if getattr(so, name) is not None
        ] + (["json_object"] if so.json_object else [])
        if len(set_fields) != 1:
            raise invalid_request(
                "`structured_outputs` must set exactly one of json, regex, choice, grammar, json_object.",
                "structured_outputs",
            )
        if so.choice is not None and not so.choice:
            raise invalid_request(
                "`structured_outputs.choice` must not be empty.", "structured_outputs.choice"
            )
        _check_json_schema(so.json, "structured_outputs.json")
    if req.guided_choice is not None and not req.guided_choice:
        raise invalid_request("`guided_choice` must not be empty.", "guided_choice")
    _check_json_schema(req.guided_json, "guided_json")


def _check_json_schema(schema: str | dict[str, Any] | None, param: str) -> None:
    """A schema given as JSON text must parse to an object or a boolean (a JSON schema's two forms)."""
    if not isinstance(schema, str):
        return
    try:
        parsed = msgspec.json.decode(schema)
    except msgspec.DecodeError as err:
        raise invalid_request(f"`{param}` is not valid JSON: {err}", param) from None
    if not isinstance(parsed, dict | bool):
        raise invalid_request(f"`{param}` must be a JSON schema (an object or a boolean).", param)


def _check_content(message: ChatMessage, index: int) -> None:
    param = f"messages[{index}].content"
    content = message.content
    if content is None:
        # An assistant turn may carry only tool calls; every other role needs content.
        if message.role not in ("assistant", "function"):
            raise invalid_request(f"Missing required field `{param}`.", param)
        return
    if isinstance(content, str):
        return
    for part_index, part in enumerate(content):
        part_param = f"{param}[{part_index}]"
        if part.type == "text":
            if part.text is None:
                raise invalid_request(f"Missing required field `{part_param}.text`.", f"{part_param}.text")
        elif part.type == "prompt_embeds":
            if not part.data:
                raise invalid_request(f"Missing required field `{part_param}.data`.", f"{part_param}.data")
        elif part.type in UNSUPPORTED_PART_TYPES:
            kind = UNSUPPORTED_PART_TYPES[part.type]
            raise invalid_request(
                f"This model does not accept {kind} input (content part type {part.type!r}).",
                f"{part_param}.type",
            )
        else:
            raise invalid_request(
                f"Unknown content part type {part.type!r}: expected 'text' or 'prompt_embeds'.",
                f"{part_param}.type",
            )


def _embeds_without_prompt_logprobs() -> APIError:
    # As vLLM: embedding positions have no token to score, so prompt logprobs would be meaningless.
    return invalid_request("`prompt_logprobs` is not supported with prompt embeddings.", "prompt_logprobs")


def _has_embeds_part(message: ChatMessage) -> bool:
    return isinstance(message.content, list) and any(p.type == "prompt_embeds" for p in message.content)


def check_chat_request(req: ChatCompletionRequest) -> None:
    if not req.messages:
        raise invalid_request("`messages` must hold at least one message.", "messages")
    for index, message in enumerate(req.messages):
        if message.role not in CHAT_ROLES:
            raise invalid_request(
                f"Unknown role {message.role!r}: expected one of {', '.join(sorted(CHAT_ROLES))}.",
                f"messages[{index}].role",
            )
        _check_content(message, index)
    if req.prompt_logprobs is not None and any(_has_embeds_part(m) for m in req.messages):
        raise _embeds_without_prompt_logprobs()
    # max_completion_tokens is OpenAI's newer name for max_tokens and wins when both are given.
    _check_at_least(req.max_tokens, "max_tokens", 1)
    max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    _check_sampling(req, max_tokens_param=max_tokens_param, max_tokens=max_tokens)
    _check_logprob_count(req.top_logprobs, "top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise invalid_request("`top_logprobs` needs `logprobs` set to true.", "top_logprobs")
    if req.continue_final_message and req.add_generation_prompt:
        raise invalid_request(
            "`continue_final_message` and `add_generation_prompt` cannot both be true.",
            "continue_final_message",
        )
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise invalid_request(
            "`continue_final_message` needs the last message to be from the assistant.",
            "continue_final_message",
        )


def _check_prompt(prompt: str | list[Any]) -> None:
    empty = invalid_request("`prompt` must not be empty.", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise empty
        return
    if not prompt:
        raise empty
    shape = invalid_request(
        "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids.",
        "prompt",
    )
    if all(isinstance(item, str) for item in prompt):
        if "" in prompt:
            raise empty
        return
    if all(_is_token_ids(item) for item in prompt):
        return
    if not all(isinstance(item, list) for item in prompt):
        raise shape
    for index, item in enumerate(prompt):
        if not item:
            raise invalid_request(f"`prompt[{index}]` must not be empty.", f"prompt[{index}]")
        if not all(_is_token_ids(token_id) for token_id in item):
            raise shape


def _is_token_ids(value: Any) -> bool:
    # JSON true/false decode to bool, which is an int subclass: exclude them explicitly.
    return type(value) is int and value >= 0


def check_completion_request(req: CompletionRequest) -> None:
    if req.prompt is None and req.prompt_embeds is None:
        raise invalid_request("Missing required field `prompt`.", "prompt")
    if req.prompt is not None:
        _check_prompt(req.prompt)
    embeds = req.prompt_embeds
    # As vLLM: an empty `prompt_embeds: []` next to a text prompt is ignored (the serving code skips it).
    ignored = embeds == [] and req.prompt is not None
    if embeds is not None and not ignored and (not embeds or (isinstance(embeds, list) and "" in embeds)):
        raise invalid_request("`prompt_embeds` must not be empty.", "prompt_embeds")
    if embeds and req.prompt_logprobs is not None:
        raise _embeds_without_prompt_logprobs()
    if embeds and req.echo and req.logprobs is not None:
        raise invalid_request(
            "`echo` with `logprobs` needs prompt logprobs, which `prompt_embeds` prompts do not have.",
            "echo",
        )
    if req.suffix:
        raise invalid_request("`suffix` is not supported.", "suffix")
    _check_sampling(req, max_tokens_param="max_tokens", max_tokens=req.max_tokens)
    _check_logprob_count(req.logprobs, "logprobs")
