"""POST /tokenize and POST /detokenize, as vLLM serves them: text or a chat in, token ids out, and back."""

from __future__ import annotations

from typing import Any

import msgspec

from frontend.errors import invalid_request
from frontend.schemas import ChatCompletionRequest, ChatMessage
from frontend.schemas.checks import check_chat_request
from frontend.schemas.requests import OpenAIBody
from frontend.serving.model_context import ModelContext


class TokenizeRequest(OpenAIBody):
    """vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one: exactly one of prompt / messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(OpenAIBody):
    tokens: list[int]
    model: str | None = None


def tokenize(ctx: ModelContext, req: TokenizeRequest) -> dict[str, Any]:
    ctx.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise invalid_request("Give exactly one of `prompt` and `messages`.", "prompt")
    if req.prompt is not None:
        add_special = req.add_special_tokens if req.add_special_tokens is not None else True
        token_ids = _encode_text(ctx, req.prompt, add_special)
    else:
        token_ids = _encode_chat(ctx, req)
    body: dict[str, Any] = {"count": len(token_ids), "max_model_len": ctx.max_model_len, "tokens": token_ids}
    body["token_strs"] = [ctx.tokenizer.id_to_token(t) for t in token_ids] if req.return_token_strs else None
    return body


def _encode_text(ctx: ModelContext, text: str, add_special: bool) -> list[int]:
    if ctx.ready.task == "embed":
        # Encoder tokenizers add their own [CLS]/[SEP] through the post-processor.
        return ctx.tokenize_text(text, add_special_tokens=add_special)
    return ctx.encode(text, add_special_tokens=add_special)


def _encode_chat(ctx: ModelContext, req: TokenizeRequest) -> list[int]:
    from frontend.serving.chat import render_chat_prompt

    chat = ChatCompletionRequest(
        messages=req.messages or [],
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template_kwargs=req.chat_template_kwargs,
        tools=req.tools,
    )
    check_chat_request(chat)
    text, _embeds = render_chat_prompt(ctx, chat)
    # The template already wrote the special tokens it wants; vLLM adds none by default here.
    return ctx.encode(text, add_special_tokens=bool(req.add_special_tokens))


def detokenize(ctx: ModelContext, req: DetokenizeRequest) -> dict[str, Any]:
    ctx.check_model(req.model)
    vocab_size = ctx.tokenizer.get_vocab_size(with_added_tokens=True)
    for token_id in req.tokens:
        if not 0 <= token_id < max(vocab_size, ctx.ready.vocab_size):
            raise invalid_request(
                f"`tokens` holds token id {token_id}, outside the vocabulary (size {ctx.ready.vocab_size}).",
                "tokens",
            )
    return {"prompt": ctx.tokenizer.decode(req.tokens, skip_special_tokens=False)}


tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)
