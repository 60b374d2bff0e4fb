"""Structured-output specs checked in the API process: size caps from the text alone, and the dry run that
matches a few tokens with the default model's real tokenizer, where llguidance's limits show."""

from __future__ import annotations

import json

import pytest

from frontend.errors import APIError
from frontend.serving.tool_schema import required_schema
from frontend.serving.tools import MAX_REQUIRED_TOOLS
from frontend.structured_check import MAX_CHOICES, GrammarDryRun, check_structured_spec
from protocol.messages import StructuredSpec


@pytest.fixture(scope="module")
def dry_run() -> GrammarDryRun:
    from engine.loader.gguf_tokenizer import gguf_tokenizer_info
    from engine.loader.model_loader import _gguf_in, open_gguf, read_metadata, resolve_model_path

    metadata = read_metadata(open_gguf(_gguf_in(resolve_model_path(None))))
    info = gguf_tokenizer_info(metadata)
    return GrammarDryRun(info.tokenizer_json, 49_152, [2])


def _reason(spec: StructuredSpec, dry_run: GrammarDryRun | None = None) -> str:
    with pytest.raises(APIError) as info:
        check_structured_spec(spec, "structured_outputs", dry_run)
    assert info.value.status == 400 and info.value.param == "structured_outputs"
    assert "\n" not in info.value.message and "<state>" not in info.value.message
    assert "<non-verbose/>" not in info.value.message
    return info.value.message


def test_size_caps_answer_from_the_text_alone() -> None:
    assert "entries" in _reason(StructuredSpec(choice=[str(i) for i in range(MAX_CHOICES + 1)]))
    assert "characters" in _reason(StructuredSpec(choice=["x" * 5_000]))
    assert "99999999" in _reason(StructuredSpec(regex="a{99999999}"))
    assert "100001" in _reason(StructuredSpec(regex="[ab]{2,100001}"))
    schema = {"type": "object", "properties": {"x" * 2_000: {"type": "string"}}}
    assert "property name" in _reason(StructuredSpec(json_schema=json.dumps(schema)))
    long_string = {"type": "string", "maxLength": 99_999_999}
    assert "length bound" in _reason(StructuredSpec(json_schema=json.dumps(long_string)))


def test_the_dry_run_finds_limits_that_only_show_when_tokens_are_matched(dry_run: GrammarDryRun) -> None:
    grammar = "start: " + " | ".join(f'"alt{i}"' for i in range(5_000))
    check_structured_spec(StructuredSpec(grammar=grammar), "structured_outputs")  # compiles fine
    assert "items" in _reason(StructuredSpec(grammar=grammar), dry_run)


@pytest.mark.parametrize(
    "spec",
    [
        StructuredSpec(choice=["yes", "no"]),
        StructuredSpec(regex="[a-z]{1,20}"),
        StructuredSpec(json_schema=json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})),
        StructuredSpec(grammar='start: "a" | "b" | "c"'),
    ],
)
def test_ordinary_specs_pass_the_dry_run(dry_run: GrammarDryRun, spec: StructuredSpec) -> None:
    check_structured_spec(spec, "structured_outputs", dry_run)
    assert dry_run.error(spec) is None  # cached now


def _tools_spec(num_tools: int) -> StructuredSpec:
    parameters = {"type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]}
    functions = {f"tool_{i}": {"name": f"tool_{i}", "parameters": parameters} for i in range(num_tools)}
    return StructuredSpec(
        json_schema=json.dumps(required_schema(functions, parallel=True, max_string_chars=1000))
    )


def test_required_tools_cap_is_the_grammar_limit(dry_run: GrammarDryRun) -> None:
    """The cap on tools for `tool_choice: "required"` (checked before this, in frontend/serving/tools.py) is
    where llguidance's row limit starts: MAX_REQUIRED_TOOLS tools pass the dry run, one more does not."""
    check_structured_spec(_tools_spec(MAX_REQUIRED_TOOLS), "tool_choice", dry_run)
    assert "items" in _reason(_tools_spec(MAX_REQUIRED_TOOLS + 1), dry_run)
