"""POST /inference/v1/generate: token ids in, token ids out (vLLM's tokens-in/tokens-out endpoint).

No template and no detokenized text in the answer: the caller owns tokenization. The sampling fields
are those of /v1/completions, nested under `sampling_params`, and go through the same checks.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.responses import Response

from frontend.engine_client import EngineClient
from frontend.errors import APIError, choice_error, invalid_request
from frontend.sampling_params import check_prompt_token_ids
from frontend.schemas import CompletionRequest, StreamOptions
from frontend.schemas.checks import check_completion_request
from frontend.schemas.requests import Request
from frontend.serving.generation import (
    ChoiceJob,
    PreparedPrompt,
    output_factory,
    plan_choices,
    run_choices,
    usage_dict,
)
from frontend.serving.model_context import ModelContext
from frontend.serving.model_task import require_task
from frontend.serving.output import ChoiceDelta, ChoiceOutput
from frontend.serving.responses import chat_logprobs
from frontend.serving.streaming import first_or_error, json_response, sse_response, usage_flags
from protocol.messages import RequestDelta, TokenLogprob

# vLLM's SamplingParams default when max_tokens is not given.
DEFAULT_GENERATE_MAX_TOKENS = 16


class GenerateRequest(Request):
    token_ids: list[int]
    sampling_params: CompletionRequest = msgspec.field(default_factory=CompletionRequest)
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    request_id: str | None = None
    cache_salt: str | None = None
    priority: int | None = None


class _GenerateOutput(ChoiceOutput):
    """A choice that also keeps the prompt logprobs the engine sends with its first delta."""

    prompt_logprobs: list[TokenLogprob | None] | None = None

    def process(self, delta: RequestDelta) -> ChoiceDelta:
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = delta.prompt_logprobs
        return super().process(delta)


def _check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    if not token_ids:
        raise invalid_request("`token_ids` must not be empty.", "token_ids")
    for token_id in token_ids:
        if type(token_id) is not int or token_id < 0:
            raise invalid_request(f"`token_ids` must hold token ids >= 0, got {token_id!r}.", "token_ids")
    check_prompt_token_ids(token_ids, vocab_size=vocab_size, param="token_ids")


def _sampling_request(req: GenerateRequest) -> tuple[CompletionRequest, int | None]:
    """The nested sampling fields as a checked completion request, and prompt_logprobs (-1: all)."""
    sp = req.sampling_params
    prompt_logprobs = sp.prompt_logprobs
    if prompt_logprobs is not None and prompt_logprobs < -1:
        raise invalid_request(
            f"`sampling_params.prompt_logprobs` must be -1 (all) or at least 0, got {prompt_logprobs}.",
            "sampling_params.prompt_logprobs",
        )
    if sp.n not in (None, 1):
        raise invalid_request("`sampling_params.n` must be 1 on this endpoint.", "sampling_params.n")
    completion = msgspec.structs.replace(
        sp,
        prompt=req.token_ids,
        stream=req.stream,
        stream_options=req.stream_options,
        # -1 is outside the completions range check; the value is restored after it.
        prompt_logprobs=None if prompt_logprobs == -1 else prompt_logprobs,
        echo=None,
    )
    try:
        check_completion_request(completion)
    except APIError as err:
        if err.param and err.param not in ("stream_options", "prompt"):
            err.param = f"sampling_params.{err.param}"
        raise
    if prompt_logprobs is not None and req.stream:
        raise invalid_request("`prompt_logprobs` is not available when `stream` is true.", "stream")
    return completion, prompt_logprobs


async def create_generate(
    ctx: ModelContext, client: EngineClient, req: GenerateRequest, request_id: str
) -> Response:
    require_task(ctx, "generate", "/inference/v1/generate")
    ctx.check_model(req.model)
    _check_token_ids(req.token_ids, ctx.ready.vocab_size)
    completion, prompt_logprobs = _sampling_request(req)
    num_prompt_tokens = len(req.token_ids)
    if completion.max_tokens is None:
        # vLLM's SamplingParams default (a model's max_new_tokens caps it in ctx.sampling_params).
        completion = msgspec.structs.replace(
            completion,
            max_tokens=min(DEFAULT_GENERATE_MAX_TOKENS, max(ctx.max_model_len - num_prompt_tokens, 1)),
        )
    sampling = ctx.sampling_params(completion, num_prompt_tokens)
    if prompt_logprobs == -1:
        sampling = msgspec.structs.replace(sampling, prompt_logprobs=ctx.ready.vocab_size)
    make_output = output_factory(ctx.tokenizer, completion, _GenerateOutput)

    response_id = req.request_id or uuid.uuid4().hex
    prompt = PreparedPrompt(list(req.token_ids))
    jobs = plan_choices(
        f"gen-{response_id}-{uuid.uuid4().hex[:8]}",
        [prompt],
        [sampling],
        1,
        make_output,
        priority=req.priority or 0,
        cache_salt=req.cache_salt,
    )
    events = await first_or_error(run_choices(client, jobs))
    if req.stream:
        return sse_response(_stream(events, jobs, response_id, req, completion))
    return json_response(await _collect(events, jobs, response_id, ctx, completion))


def _logprobs(entries: list, completion: CompletionRequest) -> dict[str, Any] | None:
    return chat_logprobs(entries) if completion.logprobs is not None else None


def _prompt_logprobs(ctx: ModelContext, entries: list[TokenLogprob | None] | None) -> list | None:
    """vLLM's shape: per prompt position None or {token_id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        position = {
            str(entry.token_id): {
                "logprob": entry.logprob,
                "rank": entry.rank,
                "decoded_token": ctx.tokenizer.decode([entry.token_id], skip_special_tokens=False),
            }
        }
        for rank, (token_id, logprob) in enumerate(zip(entry.top_ids, entry.top_logprobs, strict=False), 1):
            position.setdefault(
                str(token_id),
                {
                    "logprob": logprob,
                    "rank": rank,
                    "decoded_token": ctx.tokenizer.decode([token_id], skip_special_tokens=False),
                },
            )
        out.append(position)
    return out


async def _collect(
    events: AsyncIterator[tuple[ChoiceJob, ChoiceDelta]],
    jobs: list[ChoiceJob],
    response_id: str,
    ctx: ModelContext,
    completion: CompletionRequest,
) -> dict[str, Any]:
    async for _job, delta in events:
        if delta.error:
            raise choice_error(delta.error, delta.error_status)
    output = jobs[0].output
    return {
        "request_id": response_id,
        "choices": [
            {
                "index": 0,
                "token_ids": output.token_ids,
                "logprobs": _logprobs(output.logprobs, completion),
                "finish_reason": output.finish_reason,
            }
        ],
        "prompt_logprobs": _prompt_logprobs(ctx, getattr(output, "prompt_logprobs", None)),
        "kv_transfer_params": None,
        "usage": usage_dict(jobs),
    }


async def _stream(
    events: AsyncIterator[tuple[ChoiceJob, ChoiceDelta]],
    jobs: list[ChoiceJob],
    response_id: str,
    req: GenerateRequest,
    completion: CompletionRequest,
) -> AsyncIterator[dict[str, Any] | APIError]:
    include_usage, continuous = usage_flags(req.stream_options)
    async for _job, delta in events:
        if delta.error:
            yield choice_error(delta.error, delta.error_status)
            return
        if not delta.token_ids and delta.finish_reason is None:
            continue
        chunk: dict[str, Any] = {
            "request_id": response_id,
            "choices": [
                {
                    "index": 0,
                    "token_ids": delta.token_ids,
                    "logprobs": _logprobs(delta.logprobs, completion),
                    "finish_reason": delta.finish_reason,
                }
            ],
        }
        if continuous:
            chunk["usage"] = usage_dict(jobs)
        yield chunk
    if include_usage:
        yield {"request_id": response_id, "choices": [], "usage": usage_dict(jobs)}


generate_decoder = msgspec.json.Decoder(GenerateRequest)
