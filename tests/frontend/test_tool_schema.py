"""The schemas that force tool calls: references inside a tool's parameters still resolve once the tool
is nested in the `required` schema (issue 16 item 13), and open strings get a bound (item 15). Checked
with llguidance (the engine's grammar library) and jsonschema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import llguidance
import pytest

from contract.grammar import JSON_OPTIONS
from frontend.serving.tool_schema import arguments_schema, bound_strings, required_schema

LOCATION_TOOL = {
    "name": "find_place",
    "parameters": {
        "type": "object",
        "properties": {
            "where": {"$ref": "#/$defs/Location"},
            "near": {"type": "array", "items": {"$ref": "#/definitions/Tag"}},
        },
        "required": ["where"],
        "$defs": {
            "Location": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "inside": {"$ref": "#/$defs/Location"}},
                "required": ["city"],
            }
        },
        "definitions": {"Tag": {"enum": ["park", "shop"]}},
    },
}
# A second tool with a definition of the same name but another shape: the two must not collide.
OTHER_TOOL = {
    "name": "other",
    "parameters": {
        "type": "object",
        "properties": {"loc": {"$ref": "#/$defs/Location"}},
        "required": ["loc"],
        "$defs": {"Location": {"type": "integer"}},
    },
}


def _llguidance_error(schema: dict[str, Any]) -> str:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    return llguidance.LLMatcher.validate_grammar(grammar)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_schema_with_refs_compiles_and_validates(parallel: bool) -> None:
    functions = {"find_place": LOCATION_TOOL, "other": OTHER_TOOL}
    schema = required_schema(functions, parallel=parallel)
    assert _llguidance_error(schema) == ""  # before: "Pointer '/$defs/Location' does not exist"
    place = {"name": "find_place", "arguments": {"where": {"city": "Oslo", "inside": {"city": "X"}}}}
    other = {"name": "other", "arguments": {"loc": 3}}
    good: Any = [place, other] if parallel else place
    jsonschema.validate(good, schema)
    bad_place = {"name": "find_place", "arguments": {"where": {"inside": {}}}}
    bad_other = {"name": "other", "arguments": {"loc": {"city": "Oslo"}}}  # the other tool's Location
    for bad in (bad_place, bad_other):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([bad] if parallel else bad, schema)
    # The caller's tool definitions are left as they were.
    assert LOCATION_TOOL["parameters"]["properties"]["where"] == {"$ref": "#/$defs/Location"}  # type: ignore[index]


def test_tools_without_refs_stay_inline() -> None:
    plain = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    schema = required_schema({"f": plain}, parallel=False)
    assert "$defs" not in schema and schema["properties"]["arguments"] == plain["parameters"]


def test_undeclared_keys_are_closed_unless_the_tool_allows_them() -> None:
    schema = {
        "type": "object",
        "properties": {
            # A property named like keywords: its name map is not a schema, so nothing is added to it.
            "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "type": {"type": "object", "additionalProperties": {"type": "integer"}, "properties": {}},
        },
    }
    arguments = arguments_schema({"name": "f", "parameters": schema}, 10)
    assert arguments["additionalProperties"] is False
    inner = arguments["properties"]
    assert set(inner) == {"properties", "type"}  # no key added to the name map
    assert inner["properties"]["additionalProperties"] is False
    assert inner["type"]["additionalProperties"] == {"type": "integer"}  # the tool's own choice
    jsonschema.validate({"properties": {"a": 1}, "type": {"x": 2}}, arguments)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"properties": {"a": 1}, "invented": "..."}, arguments)
    assert "additionalProperties" not in arguments_schema({"name": "f", "parameters": schema}, None)


def test_open_strings_are_bounded_and_shaped_ones_left_alone() -> None:
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "string"},
            "nullable": {"type": ["string", "null"]},
            "short": {"type": "string", "maxLength": 5},
            "pattern": {"type": "string", "pattern": "^[a-z]+$"},
            "choice": {"type": "string", "enum": ["a", "b"]},
            "list": {"type": "array", "items": {"type": "string"}},
            "data": {"const": {"type": "string"}},  # a value, not a subschema
        },
    }
    bound_strings(schema, 7)
    props = schema["properties"]
    assert props["free"]["maxLength"] == props["nullable"]["maxLength"] == 7
    assert props["list"]["items"] == {"type": "string", "maxLength": 7}
    assert props["short"]["maxLength"] == 5
    assert "maxLength" not in props["pattern"] and "maxLength" not in props["choice"]
    assert props["data"] == {"const": {"type": "string"}}
    # No parameters: the only call is `{}`.
    assert arguments_schema({"name": "f"}, 7) == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
