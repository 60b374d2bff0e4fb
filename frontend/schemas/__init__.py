"""OpenAI request schemas: decode a body into a validated struct, or raise a 400 `APIError` naming the field."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from frontend.errors import APIError, invalid_request
from frontend.schemas.checks import check_chat_request, check_completion_request
from frontend.schemas.int_ranges import check_int_ranges
from frontend.schemas.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    JsonSchemaFormat,
    ResponseFormat,
    SamplingFields,
    StreamOptions,
    StructuredOutputs,
)

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "JsonSchemaFormat",
    "ResponseFormat",
    "SamplingFields",
    "StreamOptions",
    "StructuredOutputs",
    "decode_chat_request",
    "decode_completion_request",
    "prompt_kind",
]

_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)

_MISSING_FIELD = re.compile(r"Object missing required field `([^`]+)`")
_AT_PATH = re.compile(r" - at `\$(.*)`$")


def _param_from_path(path: str) -> str | None:
    """msgspec's `$.messages[0].content` -> `messages[0].content`; dict values (`[...]`) name the dict."""
    path = path.replace("[...]", "").lstrip(".")
    return path or None


def _validation_error(err: msgspec.ValidationError) -> APIError:
    text = str(err)
    at = _AT_PATH.search(text)
    path = at.group(1) if at else ""
    reason = text[: at.start()] if at else text
    missing = _MISSING_FIELD.match(reason)
    if missing:
        param = _param_from_path(f"{path}.{missing.group(1)}")
        return invalid_request(f"Missing required field `{param}`.", param)
    param = _param_from_path(path)
    if param is None:
        return invalid_request(f"Invalid request body: {reason}.")
    return invalid_request(f"Invalid value for `{param}`: {reason}.", param)


def _decode(decoder: msgspec.json.Decoder, body: bytes) -> Any:
    try:
        req = decoder.decode(body)
    except msgspec.ValidationError as err:  # subclass of DecodeError: must come first
        raise _validation_error(err) from None
    except msgspec.DecodeError as err:
        raise invalid_request(f"Invalid JSON body: {err}") from None
    check_int_ranges(req)
    return req


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat completion body; raises `APIError` (400) naming the bad field."""
    req: ChatCompletionRequest = _decode(_chat_decoder, body)
    check_chat_request(req)
    return req


def decode_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a completion body; raises `APIError` (400) naming the bad field."""
    req: CompletionRequest = _decode(_completion_decoder, body)
    check_completion_request(req)
    return req


def prompt_kind(prompt: str | list[Any]) -> str:
    """Which of OpenAI's four prompt shapes a (checked) prompt has: "text", "texts", "tokens", "token_lists"."""
    if isinstance(prompt, str):
        return "text"
    first = prompt[0]
    if isinstance(first, str):
        return "texts"
    if isinstance(first, list):
        return "token_lists"
    return "tokens"
