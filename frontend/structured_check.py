"""Checks a structured-output spec in the API process: a bad schema, regex or grammar is a 400 carrying
llguidance's own message, before anything reaches an engine. No tokenizer and no torch are needed."""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

import llguidance

from frontend.errors import invalid_request
from frontend.schemas import ChatCompletionRequest, CompletionRequest
from protocol.messages import StructuredSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict that exists only in the stub

# Must equal engine/structured.py's JSON_OPTIONS: the frontend checks the grammar the engine will build.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


@functools.lru_cache(maxsize=512)
def _grammar_error(kind: str, text: str) -> str | None:
    """llguidance's message for an unusable spec, or None. Cached: clients repeat the same schemas."""
    try:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(text)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", text)
        else:
            grammar = llguidance.grammar_from("grammar", text)
    except ValueError as exc:
        return str(exc)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    return error or None


def _kind_and_text(spec: StructuredSpec) -> tuple[str, str] | None:
    if spec.json_schema is not None:
        return "json", spec.json_schema
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.choice is not None:
        return "choice", json.dumps(spec.choice)
    if spec.grammar is not None:
        return "grammar", spec.grammar
    return None  # any JSON object: always valid


def spec_param(req: ChatCompletionRequest | CompletionRequest) -> str:
    """The request field that carried the constraint, for the error's `param`."""
    if req.response_format is not None and req.response_format.type != "text":
        return "response_format"
    if req.structured_outputs is not None:
        return "structured_outputs"
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(req, name) is not None:
            return name
    return "tool_choice"  # a constraint derived from tools


def check_structured_spec(spec: StructuredSpec, param: str) -> None:
    """Raises a 400 APIError when llguidance rejects the spec."""
    kind_text = _kind_and_text(spec)
    if kind_text is None:
        return
    error = _grammar_error(*kind_text)
    if error is not None:
        raise invalid_request(f"Invalid structured output constraint: {error.strip()}", param)
