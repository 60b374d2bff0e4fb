"""Structured-output specs to llguidance grammars: the API process checks the grammar the engine will build."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import llguidance

from protocol.messages import StructuredSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict that exists only in the stub

# Compact JSON with single spaces: a small model at temperature 1 otherwise spends its token budget on
# whitespace (flexible whitespace allows endless newlines). A schema can opt back in with "x-guidance".
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_JSON_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarError(ValueError):
    """The spec does not compile; the message is llguidance's."""


def spec_kind_and_text(spec: StructuredSpec) -> tuple[str, str] | None:
    """The constraint as (kind, text), kind one of json/regex/choice/grammar; None for any JSON object."""
    if spec.json_schema is not None:
        return "json", spec.json_schema
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.choice is not None:
        return "choice", json.dumps(spec.choice)
    if spec.grammar is not None:
        return "grammar", spec.grammar
    return None


def grammar_from_text(kind: str, text: str) -> str:
    """The llguidance grammar (its JSON form) for one (kind, text). Raises GrammarError for unusable text."""
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(text)
        if kind == "choice":
            return llguidance.grammar_from("choice", text)
        if kind == "grammar":
            return llguidance.grammar_from("grammar", text)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    raise ValueError(f"unknown structured-output kind {kind!r}")


def grammar_for_spec(spec: StructuredSpec) -> str:
    """The llguidance grammar for a spec. Raises GrammarError for unusable text."""
    kind_text = spec_kind_and_text(spec)
    if kind_text is None:
        return grammar_from_text("json", ANY_JSON_OBJECT_SCHEMA)
    return grammar_from_text(*kind_text)
