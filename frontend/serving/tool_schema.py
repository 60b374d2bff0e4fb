"""The JSON schemas that force a tool call through structured outputs: one function's arguments (named
choice) or one or more `{"name", "arguments"}` objects for any of the tools (required).

Two things a tool's own schema needs before it is nested or used as a constraint:
- local references (`#/$defs/X`, `#/definitions/X`, `#`) are written for the tool's schema as a root;
  nested under `properties.arguments` they would point at the combined schema's root, where nothing
  is. Each such tool is moved under the root's `$defs` and its references are rewritten to match.
- open strings: at temperature 1 a small model can write one string argument until `max_tokens`, so the
  call never closes. Strings the tool leaves unbounded get a `maxLength` (`--max-tool-argument-chars`),
  and objects that declare `properties` but say nothing about other keys get `additionalProperties:
  false`: otherwise the grammar lets the model invent keys with unbounded values, one after another.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

# Keywords whose values are data, not subschemas: a "$ref" or "type" inside them is not a keyword.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
# A string with one of these is already bounded (or shaped) by the tool's author: leave it.
_STRING_SHAPES = frozenset({"maxLength", "enum", "const", "pattern", "format"})
# An object with one of these has said what other keys it takes: leave it.
_OPEN_KEYS_KEYWORDS = frozenset({"additionalProperties", "patternProperties", "unevaluatedProperties"})


def _walk(node: Any, visit: Callable[[dict[str, Any]], None]) -> None:
    """Calls visit(schema_dict) on every subschema, skipping data-valued keywords; the name -> schema
    maps (`properties`, `$defs`, ...) are walked through, not visited, since their keys are names."""
    if isinstance(node, dict):
        visit(node)
        for key, value in node.items():
            if key in _NAMED_SCHEMAS and isinstance(value, dict):
                for child in value.values():
                    _walk(child, visit)
            elif key not in _DATA_KEYWORDS:
                _walk(value, visit)
    elif isinstance(node, list):
        for item in node:
            _walk(item, visit)


def _has_local_ref(schema: dict[str, Any]) -> bool:
    found = False

    def visit(node: dict[str, Any]) -> None:
        nonlocal found
        ref = node.get("$ref")
        found = found or (isinstance(ref, str) and ref.startswith("#"))

    _walk(schema, visit)
    return found


def _rebase_refs(schema: dict[str, Any], prefix: str) -> None:
    """Rewrites every local `$ref` in place so it resolves from the combined schema's root."""

    def visit(node: dict[str, Any]) -> None:
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            node["$ref"] = "#" + prefix + ref[1:]

    _walk(schema, visit)


def bound_strings(schema: dict[str, Any], max_chars: int) -> None:
    """Adds `maxLength: max_chars` in place to every string subschema that has no bound or shape."""

    def visit(node: dict[str, Any]) -> None:
        kind = node.get("type")
        is_string = kind == "string" or (isinstance(kind, list) and "string" in kind)
        if is_string and not _STRING_SHAPES & node.keys():
            node["maxLength"] = max_chars

    _walk(schema, visit)


def close_objects(schema: dict[str, Any]) -> None:
    """Adds `additionalProperties: false` in place to objects that list their properties and leave
    other keys unspecified (as OpenAI's strict function schemas require)."""

    def visit(node: dict[str, Any]) -> None:
        if "properties" in node and not _OPEN_KEYS_KEYWORDS & node.keys():
            node["additionalProperties"] = False

    _walk(schema, visit)


def arguments_schema(function: dict[str, Any], max_string_chars: int | None) -> dict[str, Any]:
    """A copy of the function's parameters schema, bounded (strings, undeclared keys) unless
    `max_string_chars` is None."""
    schema = copy.deepcopy(function.get("parameters") or {"type": "object", "properties": {}})
    if max_string_chars is not None:
        bound_strings(schema, max_string_chars)
        close_objects(schema)
    return schema


def required_schema(
    functions: dict[str, dict[str, Any]], *, parallel: bool, max_string_chars: int | None = None
) -> dict[str, Any]:
    """Schema of a call to any of the functions; an array of one or more calls when `parallel`."""
    defs: dict[str, Any] = {}
    calls = []
    for index, (name, function) in enumerate(functions.items()):
        arguments = arguments_schema(function, max_string_chars)
        if _has_local_ref(arguments):
            key = f"tool_{index}"
            _rebase_refs(arguments, f"/$defs/{key}")
            defs[key] = arguments
            arguments = {"$ref": f"#/$defs/{key}"}
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {"type": "array", "items": one, "minItems": 1} if parallel else one
    return {**schema, "$defs": defs} if defs else schema
