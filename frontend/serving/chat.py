"""POST /v1/chat/completions: template -> tokens -> engine -> OpenAI chat responses (JSON or SSE)."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.responses import Response

from frontend.engine_client import EngineClient
from frontend.errors import choice_error, invalid_request
from frontend.offload import run_off_loop
from frontend.schemas import ChatCompletionRequest
from frontend.schemas.to_sampling import from_openai
from frontend.serving.chat_template import (
    RESERVED_TEMPLATE_KWARGS,
    ChatTemplateError,
    normalize_messages,
)
from frontend.serving.input_processor import ChoiceJob, PreparedPrompt, truncate_prompt
from frontend.serving.model_context import ModelContext
from frontend.serving.model_task import require_task
from frontend.serving.response_context import Chunks, ResponseContext, respond, start_response
from frontend.serving.responses import chat_choice, chat_chunk, chat_logprobs, prompt_logprobs_json
from frontend.serving.tools import ToolPlan, ToolSettings, ToolStream, apply_tool_calls, plan_tools
from frontend.serving.usage import StreamUsage, usage_dict, usage_flags
from protocol.messages import WireSamplingParams


def render_chat_prompt(ctx: ModelContext, req: ChatCompletionRequest) -> tuple[str, list[str]]:
    """The rendered prompt text and any prompt-embedding parts (base64) in order."""
    if req.chat_template is not None:
        # As vLLM by default: a template sent by the client would run server-side, so it is refused.
        raise invalid_request(
            "A per-request chat_template is not accepted by this server; the model's own template is used.",
            "chat_template",
        )
    if ctx.chat_template is None:
        raise invalid_request(
            "This model has no chat template; start the server with --chat-template, or use /v1/completions.",
            "messages",
        )
    messages, embeds = normalize_messages(req.messages)
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        # These are set from the request's own fields; a second value would replace the conversation.
        raise invalid_request(
            f"`chat_template_kwargs` must not set {', '.join(reserved)}: use the request fields instead.",
            "chat_template_kwargs",
        )
    try:
        text = ctx.chat_template.render(
            messages,
            add_generation_prompt=req.add_generation_prompt
            if req.add_generation_prompt is not None
            else True,
            continue_final_message=bool(req.continue_final_message),
            tools=req.tools,
            documents=req.documents,
            **kwargs,
        )
    except ChatTemplateError as exc:
        raise exc.api_error() from exc
    return text, embeds


def prepare_chat(ctx: ModelContext, req: ChatCompletionRequest) -> PreparedPrompt:
    text, embeds = render_chat_prompt(ctx, req)
    if embeds:
        from frontend.serving.prompt_embeds import prompt_with_embeds

        prompt = prompt_with_embeds(ctx, text, embeds)
    else:
        prompt = PreparedPrompt(ctx.encode(text, add_special_tokens=False), text)
    return truncate_prompt(
        prompt, req.truncate_prompt_tokens, ctx.max_model_len, ctx.decode_prompt, req.truncation_side
    )


def echo_prefix(req: Any, prompt_index: int = 0) -> str:
    """What `echo: true` repeats before the answer, as vLLM does: the last message's content when it has
    the answer's role (the assistant's, or with no generation prompt the last message's own role), so a
    continued assistant prefix comes back whole. A batch chat request holds one conversation per prompt."""
    if not req.echo:
        return ""
    messages = req.messages
    if isinstance(messages[0], list):
        messages = messages[prompt_index]
    last = messages[-1]
    adds_prompt = req.add_generation_prompt is not False and not req.continue_final_message
    role = "assistant" if adds_prompt else last.role
    if last.role != role or last.content is None:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(part.text or "" for part in last.content if part.type == "text")


async def create_chat_completion(
    ctx: ModelContext,
    client: EngineClient,
    req: ChatCompletionRequest,
    request_id: str,
    *,
    tool_settings: ToolSettings | None = None,
) -> Response:
    require_task(ctx, "generate", "/v1/chat/completions")
    model = ctx.check_model(req.model)
    tool_plan = plan_tools(req, tool_settings or ToolSettings())
    settings = from_openai(req)

    def prepare() -> tuple[PreparedPrompt, WireSamplingParams]:
        prompt = prepare_chat(ctx, req)
        structured = tool_plan.structured if tool_plan else None
        return prompt, ctx.inputs.sampling(settings, len(prompt.token_ids), structured_override=structured)

    # Templating, tokenizing and the grammar check can take seconds on a huge request: off the loop.
    prompt, sampling = await run_off_loop(prepare)
    rc = await start_response(
        ctx,
        client,
        req,
        [prompt],
        [sampling],
        settings,
        response_id=f"chatcmpl-{uuid.uuid4().hex}",
        model=model,
        n=req.n or 1,
        tool_plan=tool_plan,
    )
    return await respond(rc, _collect_chat, _stream_chat)


def chat_choices(
    jobs: list[ChoiceJob], req: ChatCompletionRequest, tool_plan: ToolPlan | None
) -> list[dict[str, Any]]:
    """The finished choices of a non-streamed answer, with tool calls parsed out of their text."""
    choices = [
        chat_choice(
            j.index,
            j.output,
            want_logprobs=bool(req.logprobs),
            as_ids=bool(req.return_tokens_as_token_ids),
            return_token_ids=bool(req.return_token_ids),
            echo=echo_prefix(req, j.prompt_index),
        )
        for j in jobs
    ]
    if tool_plan is not None:
        for job, choice in zip(jobs, choices, strict=True):
            apply_tool_calls(choice, echo_prefix(req, job.prompt_index) + job.output.text, tool_plan)
    return choices


async def _collect_chat(rc: ResponseContext) -> dict[str, Any]:
    await rc.wait()
    req, jobs = rc.req, rc.jobs
    first = jobs[0].output
    # vLLM's extension fields are present as null when not asked for, where vLLM puts them.
    return {
        "id": rc.response_id,
        "object": "chat.completion",
        "created": rc.created,
        "model": rc.model,
        "choices": chat_choices(jobs, req, rc.tool_plan),
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage_dict(jobs),
        "prompt_logprobs": prompt_logprobs_json(
            first.tokenizer, first.prompt_logprobs, jobs[0].add.sampling.prompt_logprobs
        )
        if req.prompt_logprobs is not None
        else None,  # one list for the shared prompt
        "prompt_token_ids": list(jobs[0].add.prompt_token_ids) if req.return_token_ids else None,
        "kv_transfer_params": None,
    }


async def _stream_chat(rc: ResponseContext) -> Chunks:
    req, jobs, tool_plan = rc.req, rc.jobs, rc.tool_plan
    response_id, created, model = rc.response_id, rc.created, rc.model
    include_usage, continuous = usage_flags(req.stream_options)
    usage = StreamUsage(jobs)
    as_ids, return_token_ids = bool(req.return_tokens_as_token_ids), bool(req.return_token_ids)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = chat_chunk(
            response_id,
            created,
            model,
            choices,
            usage.current() if continuous else None,
            with_usage_key=include_usage,
        )
        body.update(extra)
        return body

    tool_streams = {job.index: ToolStream(tool_plan) for job in jobs} if tool_plan else {}
    # vLLM sends the prompt's token ids once, on the first chunk.
    first_extra = {"prompt_token_ids": list(jobs[0].add.prompt_token_ids)} if return_token_ids else {}
    for job in jobs:
        yield chunk(
            [
                {
                    "index": job.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            **first_extra,
        )
        first_extra = {}
    echo = echo_prefix(req)
    if echo:  # the continued prefix, before any generated text (completion_tokens still 0)
        for job in jobs:
            yield chunk(
                [{"index": job.index, "delta": {"content": echo}, "logprobs": None, "finish_reason": None}]
            )
    async for job, delta in rc.events:
        if delta.error:
            yield choice_error(delta.error, delta.error_status)
            return
        usage.add(job.index, delta)
        finish_reason = delta.finish_reason
        if tool_plan is not None:  # content and tool-call deltas from the choice's parser
            message, finish_reason = tool_streams[job.index].step(delta.text, finish_reason)
            if not message and finish_reason is None and not (req.logprobs and delta.logprobs):
                continue
        else:
            if not delta.text and finish_reason is None and not (req.logprobs and delta.logprobs):
                continue
            message = {"content": delta.text} if delta.text or finish_reason is None else {}
        choice: dict[str, Any] = {
            "index": job.index,
            "delta": message,
            "logprobs": chat_logprobs(delta.logprobs, as_ids=as_ids) if req.logprobs else None,
            "finish_reason": finish_reason,
        }
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        if return_token_ids:
            choice["token_ids"] = usage.take_token_ids(job.index)
        yield chunk([choice])
    if include_usage:
        yield chat_chunk(response_id, created, model, [], usage_dict(jobs), with_usage_key=True)
