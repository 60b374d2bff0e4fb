"""Range and consistency checks of decoded requests, one by one, each error naming its field."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from frontend.errors import APIError, invalid_request
from frontend.sampling_params import check_at_least, check_logprob_count, check_sampling_request
from frontend.schemas.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    StructuredOutputs,
)
from frontend.schemas.to_sampling import from_openai

TRUNCATION_SIDES = ("left", "right")
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


def _check_sampling(req: SamplingFields) -> None:
    """The body's sampling fields: the transport-neutral checks of `frontend.sampling_params` (the same
    the offline API runs), then what only an HTTP body can get wrong."""
    _check_logit_bias_keys(req.logit_bias)
    check_sampling_request(from_openai(req, with_structured=False))
    if req.prompt_logprobs is not None and req.stream:
        raise invalid_request("`prompt_logprobs` is not available when `stream` is true.", "prompt_logprobs")
    if req.stream_options is not None and not req.stream:
        raise invalid_request("`stream_options` can only be set when `stream` is true.", "stream_options")
    if req.use_beam_search:
        raise invalid_request("Beam search is not supported.", "use_beam_search")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid_request("`best_of` different from `n` is not supported.", "best_of")
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens != -1:
        check_at_least(req.truncate_prompt_tokens, "truncate_prompt_tokens", 1)
    if req.truncation_side is not None and req.truncation_side not in TRUNCATION_SIDES:
        raise invalid_request(
            f"`truncation_side` must be 'left' or 'right', got {req.truncation_side!r}.", "truncation_side"
        )
    _check_structured(req)


def _check_logit_bias_keys(logit_bias: dict[str, float] | None) -> None:
    for key in logit_bias or {}:
        # Strictly ASCII digits: int() would also take " 1", "1_0" and other scripts' digits ("١").
        if _TOKEN_ID_KEY.fullmatch(key) is None:
            raise invalid_request(f"`logit_bias` keys must be token ids, got {key[:40]!r}.", "logit_bias")


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
    if req.structured_outputs is not None:
        check_structured_outputs(req.structured_outputs)
    if req.guided_choice is not None and not req.guided_choice:
        raise invalid_request("`guided_choice` must not be empty.", "guided_choice")
    _check_json_schema(req.guided_json, "guided_json")


def check_structured_outputs(so: StructuredOutputs) -> None:
    """A `structured_outputs` object (the offline API's `StructuredOutputsParams` too): one constraint."""
    set_fields = [
        name for name in ("json", "regex", "choice", "grammar") if getattr(so, name) is not None
    ] + (["json_object"] if so.json_object else [])
    if len(set_fields) != 1:
        raise invalid_request(
            "`structured_outputs` must set exactly one of json, regex, choice, grammar, json_object.",
            "structured_outputs",
        )
    if so.choice is not None and not so.choice:
        raise invalid_request("`structured_outputs.choice` must not be empty.", "structured_outputs.choice")
    _check_json_schema(so.json, "structured_outputs.json")


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
    check_at_least(req.max_tokens, "max_tokens", 1)
    _check_sampling(req)
    check_logprob_count(req.top_logprobs, "top_logprobs")
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
    _check_sampling(req)
