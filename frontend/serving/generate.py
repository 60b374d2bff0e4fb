"""POST /inference/v1/generate: token ids in, token ids out (vLLM's tokens-in/tokens-out endpoint).

No template and no detokenized text in the answer: the caller owns tokenization. The sampling fields
are those of /v1/completions, nested under `sampling_params`, and go through the same checks.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from starlette.responses import Response

from frontend.engine_client import EngineClient
from frontend.errors import APIError, choice_error, invalid_request
from frontend.offload import run_off_loop
from frontend.sampling_params import check_prompt_token_ids
from frontend.schemas import CompletionRequest, StreamOptions
from frontend.schemas.checks import check_completion_request
from frontend.schemas.requests import OpenAIBody
from frontend.schemas.to_sampling import from_openai
from frontend.serving.input_processor import ChoiceJob, PreparedPrompt
from frontend.serving.model_context import ModelContext
from frontend.serving.model_task import require_task
from frontend.serving.response_context import Chunks, ResponseContext, respond, start_response
from frontend.serving.responses import generate_logprobs, prompt_logprobs_json
from frontend.serving.usage import StreamUsage, usage_dict, usage_flags


class GenerateRequest(OpenAIBody):
    token_ids: list[int]
    sampling_params: CompletionRequest = msgspec.field(default_factory=CompletionRequest)
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    request_id: str | None = None
    cache_salt: str | None = None
    priority: int | None = None
    kv_transfer_params: dict[str, Any] | None = None  # vLLM's disaggregated serving; accepted, unused


def _check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    if not token_ids:
        raise invalid_request("`token_ids` must not be empty.", "token_ids")
    for token_id in token_ids:
        if type(token_id) is not int or token_id < 0:
            raise invalid_request(f"`token_ids` must hold token ids >= 0, got {token_id!r}.", "token_ids")
    check_prompt_token_ids(token_ids, vocab_size=vocab_size, param="token_ids")


def _sampling_request(req: GenerateRequest) -> CompletionRequest:
    """The nested sampling fields as a checked completion request (param names under sampling_params)."""
    sp = req.sampling_params
    if sp.n not in (None, 1):
        raise invalid_request("`sampling_params.n` must be 1 on this endpoint.", "sampling_params.n")
    if sp.detokenize is False and sp.stop:
        # Stop strings are matched in text; without detokenization there is none to match.
        raise invalid_request(
            "`sampling_params.stop` needs text: it cannot be combined with `detokenize: false` "
            "(use `stop_token_ids`).",
            "sampling_params.stop",
        )
    completion = msgspec.structs.replace(
        sp, prompt=req.token_ids, stream=req.stream, stream_options=req.stream_options, echo=None
    )
    try:
        check_completion_request(completion)
    except APIError as err:
        if err.param and err.param not in ("stream_options", "prompt"):
            err.param = f"sampling_params.{err.param}"
        raise
    return completion


async def create_generate(
    ctx: ModelContext, client: EngineClient, req: GenerateRequest, request_id: str
) -> Response:
    require_task(ctx, "generate", "/inference/v1/generate")
    ctx.check_model(req.model)
    _check_token_ids(req.token_ids, ctx.ready.vocab_size)
    completion = _sampling_request(req)
    # No max_tokens: all the room left in the context, as current vLLM (a model's max_new_tokens still
    # caps it in ctx.sampling_params).
    settings = from_openai(completion)
    try:
        sampling = await run_off_loop(ctx.inputs.sampling, settings, len(req.token_ids))  # grammar check
    except APIError as err:
        if err.param == "prompt":
            err.param = "token_ids"
        elif err.param and not err.param.startswith("sampling_params."):
            err.param = f"sampling_params.{err.param}"
        raise
    response_id = req.request_id or uuid.uuid4().hex
    rc = await start_response(
        ctx,
        client,
        req,
        [PreparedPrompt(list(req.token_ids))],
        [sampling],
        settings,
        response_id=response_id,
        model=ctx.model_name,
        job_prefix=f"gen-{response_id}-{uuid.uuid4().hex[:8]}",
    )
    return await respond(rc, _collect, _stream)


def _logprobs(entries: list, job: ChoiceJob) -> dict[str, Any] | None:
    num_top = job.add.sampling.logprobs
    return generate_logprobs(entries, num_top) if num_top is not None else None


async def _collect(rc: ResponseContext) -> dict[str, Any]:
    await rc.wait()
    jobs, response_id = rc.jobs, rc.response_id
    output = jobs[0].output
    return {
        "request_id": response_id,
        "choices": [
            {
                "index": 0,
                "token_ids": output.token_ids,
                "logprobs": _logprobs(output.logprobs, jobs[0]),
                "finish_reason": output.finish_reason,
            }
        ],
        "prompt_logprobs": prompt_logprobs_json(output.tokenizer, output.prompt_logprobs),
        "kv_transfer_params": None,
        "usage": usage_dict(jobs),
    }


async def _stream(rc: ResponseContext) -> Chunks:
    req, jobs, response_id = rc.req, rc.jobs, rc.response_id
    include_usage, continuous = usage_flags(req.stream_options)
    usage = StreamUsage(jobs)
    async for _job, delta in rc.events:
        if delta.error:
            yield choice_error(delta.error, delta.error_status)
            return
        usage.add(0, delta)
        if not delta.token_ids and delta.finish_reason is None:
            continue
        chunk: dict[str, Any] = {
            "request_id": response_id,
            "choices": [
                {
                    "index": 0,
                    "token_ids": delta.token_ids,
                    "logprobs": _logprobs(delta.logprobs, jobs[0]),
                    "finish_reason": delta.finish_reason,
                }
            ],
        }
        if continuous:
            chunk["usage"] = usage.current()
        yield chunk
    if include_usage:
        yield {"request_id": response_id, "choices": [], "usage": usage_dict(jobs)}


generate_decoder = msgspec.json.Decoder(GenerateRequest)
