"""Checks a structured-output spec in the API process: a bad schema, regex or grammar is a 400 carrying
llguidance's own message, before anything reaches an engine. No tokenizer and no torch are needed."""

from __future__ import annotations

import functools

import llguidance

from contract.grammar import GrammarError, grammar_from_text, spec_kind_and_text
from frontend.errors import invalid_request
from frontend.schemas import ChatCompletionRequest, CompletionRequest
from protocol.messages import StructuredSpec


@functools.lru_cache(maxsize=512)
def _grammar_error(kind: str, text: str) -> str | None:
    """llguidance's message for an unusable spec, or None. Cached: clients repeat the same schemas."""
    try:
        grammar = grammar_from_text(kind, text)  # the grammar the engine will build (contract/grammar.py)
    except GrammarError as exc:
        return str(exc)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    return error or None


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
    kind_text = spec_kind_and_text(spec)
    if kind_text is None:
        return  # any JSON object: always valid
    error = _grammar_error(*kind_text)
    if error is not None:
        raise invalid_request(f"Invalid structured output constraint: {error.strip()}", param)
