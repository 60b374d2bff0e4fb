"""Render Hugging Face chat templates (jinja2, sandboxed) exactly as `transformers` does, without importing it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from contract.chat_template_syntax import TEMPLATE_EXTENSIONS
from frontend.errors import APIError, invalid_request

# Stands in for a prompt_embeds content part in the rendered text; the caller splits the prompt there and
# splices the embedding rows in. Chosen so that no real conversation contains it by accident.
PROMPT_EMBEDS_PLACEHOLDER = "<|tandem:prompt_embeds|>"

# Appended to the final message for continue_final_message, so the render can be cut right after it.
_CONTINUE_MARK = "<|tandem:continue_final_message|> "

# Render arguments that the caller controls; template kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})

# Template runtime errors a bad conversation can provoke (e.g. `content + '...'` on a list).
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)


class ChatTemplateError(jinja2.TemplateError):
    """The template refused the conversation (raise_exception) or failed on it: a 400 for the client."""

    def api_error(self) -> APIError:
        return invalid_request(f"Chat template error: {self.message}", "messages")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters (<, >, &, '), which would change what the model sees.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class ChatTemplate:
    """One compiled chat template with the model's special tokens bound to it."""

    def __init__(
        self,
        template: str,
        *,
        bos_token: str | None,
        eos_token: str | None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=list(TEMPLATE_EXTENSIONS),
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateSyntaxError as err:
            raise ChatTemplateError(f"The chat template does not compile: {err}") from err
        self.source = template
        self._token_kwargs: dict[str, Any] = {
            **(special_tokens or {}),
            "bos_token": bos_token,
            "eos_token": eos_token,
        }

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (plain dicts, see `normalize_messages`); raises ChatTemplateError."""
        if continue_final_message:
            messages = _mark_final_message(messages)
            add_generation_prompt = False
        kwargs = {**self._token_kwargs, **template_kwargs}
        try:
            text = self._template.render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except ChatTemplateError:
            raise
        except _RENDER_ERRORS as err:
            raise ChatTemplateError(f"{type(err).__name__}: {err}") from err
        if continue_final_message:
            text = _cut_after_final_message(text)
        return text


def user_template_kwargs(chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A request's `chat_template_kwargs` minus the names `render` sets itself (passing them through
    would be a TypeError, or would let a client replace the conversation)."""
    return {k: v for k, v in (chat_template_kwargs or {}).items() if k not in RESERVED_TEMPLATE_KWARGS}


def _mark_final_message(messages: list[dict]) -> list[dict]:
    if not messages:
        raise ChatTemplateError("continue_final_message needs at least one message.")
    final = dict(messages[-1])
    content = final.get("content")
    if not isinstance(content, str):
        raise ChatTemplateError("continue_final_message needs the final message to have text content.")
    final["content"] = content + _CONTINUE_MARK
    return [*messages[:-1], final]


def _cut_after_final_message(text: str) -> str:
    mark = _CONTINUE_MARK.strip()
    at = text.rfind(mark)
    if at < 0:
        raise ChatTemplateError(
            "continue_final_message is set but the template drops the final message's content."
        )
    if text.startswith(_CONTINUE_MARK, at):
        return text[:at]
    # The template trimmed the content's trailing whitespace (and so the mark's space): trim it too.
    return text[:at].rstrip()


def normalize_messages(messages: list) -> tuple[list[dict], list[str]]:
    """Plain dicts for the template, and the base64 data of prompt_embeds parts in prompt order.

    Accepts request `ChatMessage` structs or dicts. Content given as a list of parts becomes one string
    (text parts joined by newlines, as vLLM does): templates written for string content, like SmolLM2's,
    break on lists. Each prompt_embeds part becomes `PROMPT_EMBEDS_PLACEHOLDER` in that string.
    """
    plain: list[dict] = []
    embeds: list[str] = []
    for message in messages:
        fields = _as_dict(message)
        out: dict[str, Any] = {
            "role": fields["role"],
            # An assistant turn that only made tool calls has content null; templates written for string
            # content (SmolLM2's among them) cannot concatenate None, so it becomes "".
            "content": _content_text(fields.get("content"), embeds) or "",
        }
        for key in ("name", "tool_call_id", "reasoning_content"):
            if fields.get(key) is not None:
                out[key] = fields[key]
        if fields.get("tool_calls") is not None:
            out["tool_calls"] = [_plain_tool_call(call) for call in fields["tool_calls"]]
        plain.append(out)
    return plain, embeds


def _as_dict(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        return obj
    # msgspec structs (and any object with __struct_fields__) expose their fields by name.
    return {name: getattr(obj, name) for name in obj.__struct_fields__}


def _content_text(content: Any, embeds: list[str]) -> str | None:
    if content is None or isinstance(content, str):
        return content
    pieces = []
    for part in content:
        fields = _as_dict(part)
        if fields.get("type") == "prompt_embeds":
            embeds.append(fields["data"])
            pieces.append(PROMPT_EMBEDS_PLACEHOLDER)
        else:
            pieces.append(fields.get("text") or "")
    return "\n".join(pieces)


def _plain_tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    # OpenAI sends arguments as JSON text; Hugging Face templates expect a dict (they `tojson` it).
    call = dict(call)
    function = call.get("function")
    if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
        function = dict(function)
        # Not JSON: keep the text, so the template shows what the client sent.
        with contextlib.suppress(json.JSONDecodeError):
            function["arguments"] = json.loads(function["arguments"])
        call["function"] = function
    return call
