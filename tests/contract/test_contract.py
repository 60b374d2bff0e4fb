"""The facts both sides share: checked against independent sources where one exists."""

from __future__ import annotations

import jinja2
import llguidance
import pytest
from tokenizers.pre_tokenizers import ByteLevel

from contract.byte_alphabet import BYTE_TO_UNICODE, UNICODE_TO_BYTE
from contract.chat_template_syntax import TEMPLATE_EXTENSIONS
from contract.finish_reasons import FINISH_REASON_NAMES
from contract.grammar import GrammarError, grammar_for_spec, grammar_from_text, spec_kind_and_text
from protocol.messages import FinishReason, StructuredSpec


def test_byte_alphabet_is_the_one_hugging_face_tokenizers_uses() -> None:
    assert len(BYTE_TO_UNICODE) == 256
    assert set(BYTE_TO_UNICODE.values()) == set(ByteLevel.alphabet())
    assert BYTE_TO_UNICODE[ord("a")] == "a" and BYTE_TO_UNICODE[ord(" ")] == "Ġ"  # GPT-2's space
    assert all(UNICODE_TO_BYTE[char] == byte for byte, char in BYTE_TO_UNICODE.items())


def test_every_finish_reason_has_its_openai_name() -> None:
    assert set(FINISH_REASON_NAMES) == set(FinishReason)
    assert FINISH_REASON_NAMES[FinishReason.LENGTH] == "length"


def test_templates_with_generation_blocks_compile_and_render_their_body() -> None:
    env = jinja2.Environment(extensions=list(TEMPLATE_EXTENSIONS))
    template = "{% for m in messages %}{% generation %}{{ m }}{% endgeneration %}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}"
    assert env.from_string(template).render(messages=["a", "b", "c"]) == "ab"


@pytest.mark.parametrize(
    "spec",
    [
        StructuredSpec(json_schema='{"type": "integer"}'),
        StructuredSpec(regex="[a-z]+"),
        StructuredSpec(choice=["yes", "no"]),
        StructuredSpec(grammar='start: "x"+'),
        StructuredSpec(any_json_object=True),
    ],
)
def test_every_spec_kind_gives_a_valid_grammar(spec: StructuredSpec) -> None:
    assert llguidance.LLMatcher.validate_grammar(grammar_for_spec(spec)) == ""
    kind_text = spec_kind_and_text(spec)
    if kind_text is not None:
        assert grammar_from_text(*kind_text) == grammar_for_spec(spec)


def test_unusable_text_is_a_grammar_error_with_llguidances_message() -> None:
    with pytest.raises(GrammarError):
        grammar_from_text("json", "{not json")
    with pytest.raises(ValueError, match="unknown structured-output kind"):
        grammar_from_text("yaml", "a: 1")
