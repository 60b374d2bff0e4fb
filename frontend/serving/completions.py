"""POST /v1/completions: prompts (text or token ids) -> engine -> OpenAI completion responses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import msgspec
from starlette.responses import Response

from frontend.engine_client import EngineClient
from frontend.errors import APIError, choice_error
from frontend.sampling_params import check_prompt_token_ids
from frontend.schemas import CompletionRequest
from frontend.serving.generation import (
    ChoiceJob,
    PreparedPrompt,
    output_factory,
    plan_choices,
    run_choices,
    truncate_prompt,
    usage_dict,
)
from frontend.serving.model_context import ModelContext
from frontend.serving.model_task import require_task
from frontend.serving.output import ChoiceDelta, ChoiceOutput, LogprobEntry
from frontend.serving.responses import completion_chunk, completion_logprobs, prompt_logprobs_json
from frontend.serving.streaming import first_or_error, json_response, sse_response, usage_flags

# OpenAI's legacy completions default; vLLM uses the same.
DEFAULT_COMPLETION_MAX_TOKENS = 16


def prepare_prompts(ctx: ModelContext, req: CompletionRequest) -> list[PreparedPrompt]:
    prompt = req.prompt
    prompts: list[PreparedPrompt] = []
    if req.prompt_embeds is not None:
        from frontend.serving.prompt_embeds import prompts_from_embeds

        prompts.extend(prompts_from_embeds(ctx, req.prompt_embeds))
    if prompt is None:
        return prompts
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    add_special = req.add_special_tokens if req.add_special_tokens is not None else True
    for item in items:
        if isinstance(item, str):
            prompts.append(PreparedPrompt(ctx.encode(item, add_special_tokens=add_special), item))
        else:
            check_prompt_token_ids(item, vocab_size=ctx.ready.vocab_size)
            prompts.append(
                PreparedPrompt(list(item), ctx.tokenizer.decode(list(item), skip_special_tokens=False))
            )
    return prompts


async def create_completion(
    ctx: ModelContext, client: EngineClient, req: CompletionRequest, request_id: str
) -> Response:
    require_task(ctx, "generate", "/v1/completions")
    model = ctx.check_model(req.model)
    prompts = [
        truncate_prompt(p, req.truncate_prompt_tokens, ctx.max_model_len, ctx.decode_prompt)
        for p in prepare_prompts(ctx, req)
    ]
    sampling = [
        ctx.sampling_params(req, len(p.token_ids), default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS)
        for p in prompts
    ]
    if req.echo and req.logprobs is not None:
        # Echo with logprobs shows the prompt tokens' logprobs first: the engine must compute them.
        wanted = max(req.prompt_logprobs or 0, req.logprobs)
        sampling = [msgspec.structs.replace(p, prompt_logprobs=wanted) for p in sampling]
    make_output = output_factory(ctx.tokenizer, req)

    response_id = f"cmpl-{uuid.uuid4().hex}"
    jobs = plan_choices(
        response_id,
        prompts,
        sampling,
        req.n or 1,
        make_output,
        priority=req.priority or 0,
        cache_salt=req.cache_salt,
    )
    created = int(time.time())
    events = await first_or_error(run_choices(client, jobs))
    if req.stream:
        return sse_response(_stream(events, jobs, prompts, response_id, created, model, req))
    return json_response(await _collect(events, jobs, prompts, response_id, created, model, req))


def _echo_text(req: CompletionRequest, prompts: list[PreparedPrompt], job: ChoiceJob) -> str:
    return (prompts[job.prompt_index].text or "") if req.echo else ""


def _echo_entries(req: CompletionRequest, output: ChoiceOutput) -> list[LogprobEntry]:
    """The prompt tokens' logprob entries, cut to the `logprobs` alternatives the request asked for."""
    k = req.logprobs or 0
    return [replace(e, top=e.top[:k]) for e in output.prompt_entries()]


def _logprobs(
    req: CompletionRequest,
    output: ChoiceOutput,
    entries: list[LogprobEntry],
    echo: str | None,
    text_offset: int = 0,
) -> dict[str, Any]:
    """Completion logprobs for `entries` (the first at `text_offset`); with `echo` (the echoed text) the
    prompt tokens come first and the output's offsets start after the echo."""
    if echo is None:
        return completion_logprobs(entries, text_offset)
    prompt_part = completion_logprobs(_echo_entries(req, output), 0)
    output_part = completion_logprobs(entries, len(echo))
    return {key: prompt_part[key] + output_part[key] for key in prompt_part}


def _choice_body(job: ChoiceJob, req: CompletionRequest, prompts: list[PreparedPrompt]) -> dict[str, Any]:
    echo = _echo_text(req, prompts, job)
    logprobs = None
    if req.logprobs is not None:
        logprobs = _logprobs(req, job.output, job.output.logprobs, echo if req.echo else None)
    choice: dict[str, Any] = {
        "index": job.index,
        "text": echo + job.output.text,
        "logprobs": logprobs,
        "finish_reason": job.output.finish_reason,
        "stop_reason": job.output.stop_reason,
    }
    if req.prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_logprobs_json(
            job.output.tokenizer, job.output.prompt_logprobs, req.prompt_logprobs
        )
    return choice


async def _collect(
    events: AsyncIterator[tuple[ChoiceJob, ChoiceDelta]],
    jobs: list[ChoiceJob],
    prompts: list[PreparedPrompt],
    response_id: str,
    created: int,
    model: str,
    req: CompletionRequest,
) -> dict[str, Any]:
    async for _job, delta in events:
        if delta.error:
            raise choice_error(delta.error, delta.error_status)
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [_choice_body(job, req, prompts) for job in jobs],
        "usage": usage_dict(jobs),
    }


async def _stream(
    events: AsyncIterator[tuple[ChoiceJob, ChoiceDelta]],
    jobs: list[ChoiceJob],
    prompts: list[PreparedPrompt],
    response_id: str,
    created: int,
    model: str,
    req: CompletionRequest,
) -> AsyncIterator[dict[str, Any] | APIError]:
    include_usage, continuous = usage_flags(req.stream_options)
    echoed: set[int] = set()
    offsets = {job.index: 0 for job in jobs}  # text offset of each choice's next token
    async for job, delta in events:
        if delta.error:
            yield choice_error(delta.error, delta.error_status)
            return
        text = delta.text
        echo = None
        if req.echo and job.index not in echoed:
            echoed.add(job.index)
            echo = _echo_text(req, prompts, job)
            text = echo + text
        if not text and delta.finish_reason is None and not delta.logprobs:
            continue
        logprobs = None
        if req.logprobs is not None:
            start = len(echo) if echo is not None else offsets[job.index]
            logprobs = _logprobs(req, job.output, delta.logprobs, echo, start)
            offsets[job.index] = start + sum(len(e.token) for e in delta.logprobs)
        choice: dict[str, Any] = {
            "index": job.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        yield completion_chunk(
            response_id,
            created,
            model,
            [choice],
            usage_dict(jobs) if continuous else None,
            with_usage_key=include_usage,
        )
    if include_usage:
        yield completion_chunk(response_id, created, model, [], usage_dict(jobs), with_usage_key=True)
