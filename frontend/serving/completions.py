"""POST /v1/completions: prompts (text or token ids) -> engine -> OpenAI completion responses."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import msgspec
from starlette.responses import Response

from frontend.engine_client import EngineClient
from frontend.errors import choice_error
from frontend.offload import run_off_loop
from frontend.sampling_params import SamplingRequest, check_prompt_token_ids
from frontend.schemas import CompletionRequest
from frontend.schemas.to_sampling import from_openai
from frontend.serving.input_processor import ChoiceJob, PreparedPrompt, truncate_prompt
from frontend.serving.model_context import ModelContext
from frontend.serving.model_task import require_task
from frontend.serving.output import LogprobEntry
from frontend.serving.response_context import Chunks, ResponseContext, respond, start_response
from frontend.serving.responses import completion_chunk, completion_logprobs, prompt_logprobs_json
from frontend.serving.usage import StreamUsage, usage_dict, usage_flags
from protocol.messages import WireSamplingParams

# OpenAI's legacy completions default; vLLM uses the same.
DEFAULT_COMPLETION_MAX_TOKENS = 16


def prepare_prompts(ctx: ModelContext, req: CompletionRequest) -> list[PreparedPrompt]:
    prompt = req.prompt
    prompts: list[PreparedPrompt] = []
    if req.prompt_embeds:  # an empty list next to a text prompt is ignored, as vLLM does
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


def _num_prompts(req: CompletionRequest) -> int:
    """How many prompts a (checked) request holds, counted without tokenizing any."""
    embeds = req.prompt_embeds
    count = len(embeds) if isinstance(embeds, list) else int(embeds is not None)
    prompt = req.prompt
    if prompt is None or isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return count + int(prompt is not None)
    return count + len(prompt)


def _prepare(
    ctx: ModelContext, req: CompletionRequest, settings: SamplingRequest
) -> tuple[list[PreparedPrompt], list[WireSamplingParams]]:
    prompts = [
        truncate_prompt(
            p, req.truncate_prompt_tokens, ctx.max_model_len, ctx.decode_prompt, req.truncation_side
        )
        for p in prepare_prompts(ctx, req)
    ]
    inputs = ctx.inputs
    sampling = [
        inputs.sampling(settings, len(p.token_ids), default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS)
        for p in prompts
    ]
    if req.echo and req.logprobs is not None:
        # Echo with logprobs shows the prompt tokens' logprobs first: the engine must compute them.
        sampling = [
            msgspec.structs.replace(p, prompt_logprobs=max(p.prompt_logprobs or 0, p.logprobs or 0))
            for p in sampling
        ]
    return prompts, sampling


async def create_completion(
    ctx: ModelContext, client: EngineClient, req: CompletionRequest, request_id: str
) -> Response:
    require_task(ctx, "generate", "/v1/completions")
    model = ctx.check_model(req.model)
    ctx.limits.check_fan_out(_num_prompts(req) * (req.n or 1), "prompt", "completions (prompts x n)")
    settings = from_openai(req)
    # Tokenizing, decoding embeddings and the grammar check can take seconds: off the event loop.
    prompts, sampling = await run_off_loop(_prepare, ctx, req, settings)
    rc = await start_response(
        ctx,
        client,
        req,
        prompts,
        sampling,
        settings,
        response_id=f"cmpl-{uuid.uuid4().hex}",
        model=model,
        n=req.n or 1,
    )
    return await respond(rc, _collect, _stream)


def _echo_text(rc: ResponseContext, job: ChoiceJob) -> str:
    return (rc.prompts[job.prompt_index].text or "") if rc.req.echo else ""


def _echo_entries(job: ChoiceJob) -> list[LogprobEntry]:
    """The prompt tokens' logprob entries, cut to the `logprobs` alternatives the request asked for."""
    k = job.add.sampling.logprobs or 0
    return [replace(e, top=e.top[:k], top_ids=e.top_ids[:k]) for e in job.output.prompt_entries()]


def _logprobs(
    req: CompletionRequest,
    job: ChoiceJob,
    entries: list[LogprobEntry],
    echo: str | None,
    text_offset: int = 0,
) -> dict[str, Any]:
    """Completion logprobs for `entries` (the first at `text_offset`); with `echo` (the echoed text) the
    prompt tokens come first and the output's offsets start after the echo."""
    as_ids = bool(req.return_tokens_as_token_ids)
    if echo is None:
        return completion_logprobs(entries, text_offset, as_ids=as_ids)
    prompt_part = completion_logprobs(_echo_entries(job), 0, as_ids=as_ids)
    output_part = completion_logprobs(entries, len(echo), as_ids=as_ids)
    return {key: prompt_part[key] + output_part[key] for key in prompt_part}


def _choice_body(rc: ResponseContext, job: ChoiceJob) -> dict[str, Any]:
    req = rc.req
    echo = _echo_text(rc, job)
    logprobs = None
    if req.logprobs is not None:
        logprobs = _logprobs(req, job, job.output.logprobs, echo if req.echo else None)
    prompt_logprobs = None
    if req.prompt_logprobs is not None:
        prompt_logprobs = prompt_logprobs_json(
            job.output.tokenizer, job.output.prompt_logprobs, job.add.sampling.prompt_logprobs
        )
    # vLLM's extension fields are present as null when not asked for.
    return {
        "index": job.index,
        "text": echo + job.output.text,
        "logprobs": logprobs,
        "finish_reason": job.output.finish_reason,
        "stop_reason": job.output.stop_reason,
        "token_ids": list(job.output.token_ids) if req.return_token_ids else None,
        "prompt_logprobs": prompt_logprobs,
        "prompt_token_ids": list(job.add.prompt_token_ids) if req.return_token_ids else None,
    }


async def _collect(rc: ResponseContext) -> dict[str, Any]:
    await rc.wait()
    return {
        "id": rc.response_id,
        "object": "text_completion",
        "created": rc.created,
        "model": rc.model,
        "choices": [_choice_body(rc, job) for job in rc.jobs],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage_dict(rc.jobs),
        "kv_transfer_params": None,
    }


async def _stream(rc: ResponseContext) -> Chunks:
    req, jobs, response_id, created, model = rc.req, rc.jobs, rc.response_id, rc.created, rc.model
    include_usage, continuous = usage_flags(req.stream_options)
    usage = StreamUsage(jobs)
    started: set[int] = set()  # choices that sent their first chunk (echo, prompt_token_ids)
    offsets = {job.index: 0 for job in jobs}  # text offset of each choice's next token
    async for job, delta in rc.events:
        if delta.error:
            yield choice_error(delta.error, delta.error_status)
            return
        usage.add(job.index, delta)
        text = delta.text
        echo = None
        first = job.index not in started
        if req.echo and first:
            echo = _echo_text(rc, job)
            text = echo + text
        if not text and delta.finish_reason is None and not delta.logprobs:
            continue
        started.add(job.index)
        logprobs = None
        if req.logprobs is not None:
            start = len(echo) if echo is not None else offsets[job.index]
            logprobs = _logprobs(req, job, delta.logprobs, echo, start)
            offsets[job.index] = start + sum(len(e.token) for e in delta.logprobs)
        choice: dict[str, Any] = {
            "index": job.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }
        if req.return_token_ids:  # as vLLM: the prompt's ids on the choice's first chunk only
            choice["prompt_token_ids"] = list(job.add.prompt_token_ids) if first else None
            choice["token_ids"] = usage.take_token_ids(job.index)
        yield completion_chunk(
            response_id,
            created,
            model,
            [choice],
            usage.current() if continuous else None,
            with_usage_key=include_usage,
        )
    if include_usage:
        yield completion_chunk(response_id, created, model, [], usage_dict(jobs), with_usage_key=True)
