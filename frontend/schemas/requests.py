"""Request bodies of /v1/chat/completions and /v1/completions as msgspec structs.

Unknown fields are ignored, as OpenAI does. Every optional field accepts JSON `null` (clients send it),
so defaults are resolved later, in `frontend.sampling_params`.
"""

from __future__ import annotations

from typing import Any

import msgspec


class OpenAIBody(msgspec.Struct, forbid_unknown_fields=False):
    """Base for the OpenAI-style request body structs (kwargs of msgspec.Struct are inherited)."""


class ContentPart(OpenAIBody):
    """One part of a message's content; only "text" and "prompt_embeds" parts are accepted."""

    type: str
    text: str | None = None
    data: str | None = None  # prompt_embeds: base64 of a serialized tensor


class ChatMessage(OpenAIBody):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class StreamOptions(OpenAIBody):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class JsonSchemaFormat(OpenAIBody):
    name: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(OpenAIBody):
    type: str
    json_schema: JsonSchemaFormat | None = None


# The body's `structured_outputs` object. The class name is the OpenAPI component's name, so it stays (no
# docstring: it would enter the document); the offline API's is `StructuredOutputsParams`.
class StructuredOutputs(OpenAIBody):
    json: str | dict[str, Any] | None = None  # a JSON schema, as an object or as JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(OpenAIBody):
    """Fields shared by chat and completion requests (vLLM's OpenAI server accepts all of them)."""

    model: str | None = None
    n: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    allowed_token_ids: list[int] | None = None
    user: str | None = None
    prompt_logprobs: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    priority: int | None = None
    cache_salt: str | None = None
    request_id: str | None = None
    use_beam_search: bool | None = None
    best_of: int | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = None
    echo: bool | None = None
    # vLLM extensions (docs/api.md): token ids in the answer, `token_id:N` logprob tokens, which end of a
    # prompt `truncate_prompt_tokens` keeps ("left" cuts from the left, keeping the last tokens), and
    # disaggregated-serving parameters (accepted; this server has no KV transfer, so they are ignored).
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    truncation_side: str | None = None
    kv_transfer_params: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None


class CompletionRequest(SamplingFields):
    # str | list[str] | list[int] | list[list[int]]: msgspec cannot tell list kinds apart in a union,
    # so the shape is checked by hand (and then `prompt_kind` says which one it is).
    prompt: str | list[Any] | None = None
    prompt_embeds: str | list[str] | None = None
    suffix: str | None = None
    logprobs: int | None = None
    # /inference/v1/generate's sampling_params only: false means the caller wants no text at all.
    detokenize: bool | None = None
