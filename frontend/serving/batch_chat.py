"""POST /v1/chat/completions/batch: several conversations in one request, answered as one chat.completion.

Every conversation is rendered and tokenized first, then all go to the engines at once, so they are
scheduled together; `choices[i]` answers conversation i.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from starlette.responses import Response

from frontend.engine_client import EngineClient
from frontend.errors import APIError, invalid_request
from frontend.offload import run_off_loop
from frontend.schemas import ChatCompletionRequest, ChatMessage
from frontend.schemas.checks import check_chat_request
from frontend.schemas.to_sampling import from_openai
from frontend.serving.chat import chat_choices, prepare_chat
from frontend.serving.input_processor import PreparedPrompt
from frontend.serving.model_context import ModelContext
from frontend.serving.model_task import require_task
from frontend.serving.response_context import start_response
from frontend.serving.streaming import json_response
from frontend.serving.tools import ToolSettings, plan_tools
from frontend.serving.usage import usage_dict
from protocol.messages import WireSamplingParams


class BatchChatCompletionRequest(ChatCompletionRequest, kw_only=True):
    """A chat completion request whose `messages` is a list of conversations."""

    messages: list[list[ChatMessage]]  # type: ignore[assignment]


def split_conversations(req: BatchChatCompletionRequest) -> list[ChatCompletionRequest]:
    """One checked chat request per conversation, sharing every other field; 400s name the conversation."""
    if req.n not in (None, 1):
        raise invalid_request("`n` must be 1 for batch chat completions.", "n")
    if req.use_beam_search:
        raise invalid_request("Beam search is not supported for batch chat completions.", "use_beam_search")
    if req.stream:
        raise invalid_request("Streaming is not supported for batch chat completions.", "stream")
    if not req.messages:
        raise invalid_request("`messages` must hold at least one conversation.", "messages")
    fields = {name: getattr(req, name) for name in ChatCompletionRequest.__struct_fields__}
    conversations = []
    for index, messages in enumerate(req.messages):
        conversation = ChatCompletionRequest(**{**fields, "messages": messages})
        try:
            check_chat_request(conversation)
        except APIError as err:
            if err.param and err.param.startswith("messages"):
                err.param = f"messages[{index}]{err.param.removeprefix('messages')}"
                err.message = f"Conversation {index}: {err.message}"
            raise
        conversations.append(conversation)
    return conversations


async def create_batch_chat_completion(
    ctx: ModelContext,
    client: EngineClient,
    req: BatchChatCompletionRequest,
    request_id: str,
    *,
    tool_settings: ToolSettings | None = None,
) -> Response:
    require_task(ctx, "generate", "/v1/chat/completions/batch")
    model = ctx.check_model(req.model)
    ctx.limits.check_fan_out(len(req.messages), "messages", "conversations")
    conversations = split_conversations(req)
    # `tools` and `tool_choice` are shared fields, so every conversation has this same plan.
    tool_plan = plan_tools(req, tool_settings or ToolSettings())
    structured = tool_plan.structured if tool_plan else None

    settings = from_openai(conversations[0])  # every conversation shares the sampling fields

    def prepare() -> tuple[list[PreparedPrompt], list[WireSamplingParams]]:
        prompts = [prepare_chat(ctx, conversation) for conversation in conversations]
        inputs = ctx.inputs
        sampling = [
            inputs.sampling(settings, len(prompt.token_ids), structured_override=structured)
            for prompt in prompts
        ]
        return prompts, sampling

    prompts, sampling = await run_off_loop(prepare)  # every template and tokenization, off the loop
    rc = await start_response(
        ctx,
        client,
        req,
        prompts,
        sampling,
        settings,
        response_id=f"chatcmpl-{uuid.uuid4().hex}",
        model=model,
        tool_plan=tool_plan,
    )
    await rc.wait()
    body: dict[str, Any] = {
        "id": rc.response_id,
        "object": "chat.completion",
        "created": rc.created,
        "model": rc.model,
        "choices": chat_choices(rc.jobs, req, tool_plan),
        "usage": usage_dict(rc.jobs),
    }
    return json_response(body)


batch_chat_decoder = msgspec.json.Decoder(BatchChatCompletionRequest)
