"""Issue 7 acceptance, structured outputs: on the default model at temperature 1, every sample obeys its
JSON schema, regex or choice list; bad constraints are 400s with llguidance's message."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess

NUM_SAMPLES = 20
SCHEMA = {
    "type": "object",
    "properties": {
        "person": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 16},
                "age": {"type": "integer", "minimum": 18, "maximum": 99},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 10},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["person", "role", "scores"],
    "additionalProperties": False,
}
# [0-9] rather than \d: llguidance's \d is Unicode-aware (see docs/structured-outputs-and-tools.md).
PLATE = r"[A-Z]{2}-[0-9]{3}"
CHOICES = ["red", "green", "dark blue"]


def chat(server: ServerProcess, content: str, **fields: Any) -> httpx.Response:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "temperature": 1.0,
        **fields,
    }
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=600)


def contents(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [c["message"]["content"] for c in response.json()["choices"]]


def test_json_schema_samples_all_validate(default_server: ServerProcess) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}
    response = chat(
        default_server, "Describe a user as JSON.", n=NUM_SAMPLES, max_tokens=80, response_format=fmt
    )
    texts = contents(response)
    assert len(texts) == NUM_SAMPLES
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert {c["finish_reason"] for c in response.json()["choices"]} == {"stop"}


def test_regex_samples_all_match(default_server: ServerProcess) -> None:
    texts = contents(
        chat(
            default_server,
            "Make up a licence plate.",
            n=NUM_SAMPLES,
            max_tokens=16,
            structured_outputs={"regex": PLATE},
        )
    )
    assert len(texts) == NUM_SAMPLES
    assert all(re.fullmatch(PLATE, text) for text in texts), texts


def test_choice_is_always_one_of_the_choices(default_server: ServerProcess) -> None:
    texts = contents(
        chat(default_server, "Pick a colour.", n=NUM_SAMPLES, max_tokens=8, guided_choice=CHOICES)
    )
    assert len(texts) == NUM_SAMPLES and set(texts) <= set(CHOICES)


def test_grammar_json_object_and_completions_endpoint(default_server: ServerProcess) -> None:
    (text,) = contents(
        chat(
            default_server, "Yes or no?", max_tokens=8, structured_outputs={"grammar": 'start: "yes" | "no"'}
        )
    )
    assert text in ("yes", "no")
    # The grammar guarantees a JSON prefix; whether the small model closes the object within max_tokens
    # depends on its sampling, so: every stopped choice parses, every cut one is a prefix, and most stop.
    response = chat(
        default_server,
        'Reply with exactly this JSON: {"ok": true}',
        max_tokens=100,
        n=4,
        seed=7,
        response_format={"type": "json_object"},
    )
    choices = response.json()["choices"]
    for choice in choices:
        text = choice["message"]["content"]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert choice["finish_reason"] == "length" and text.lstrip().startswith("{")
    assert sum(c["finish_reason"] == "stop" for c in choices) >= 2
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "Plate:", "max_tokens": 16, "guided_regex": PLATE, "n": 3}
    response = httpx.post(f"{default_server.base_url}/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    assert all(re.fullmatch(PLATE, c["text"]) for c in response.json()["choices"])


def test_max_tokens_mid_structure_is_length(default_server: ServerProcess) -> None:
    response = chat(default_server, "JSON.", max_tokens=4, guided_json=SCHEMA)
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
        ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs", "unknown name"),
        ({"guided_json": {"type": "strin"}}, "guided_json", "strin"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"minimum": "a"}},
                }
            },
            "response_format",
            "minimum",
        ),
    ],
)
def test_invalid_constraints_are_400_with_the_library_message(
    default_server: ServerProcess, fields: dict[str, Any], param: str, needle: str
) -> None:
    response = chat(default_server, "hi", max_tokens=4, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and needle in error["message"]
    assert error["type"] == "invalid_request_error"
