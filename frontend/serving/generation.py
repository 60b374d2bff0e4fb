"""Runs the engine requests behind one API request (n choices x prompts) and merges their deltas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from frontend.engine_client import EngineClient, EngineUnavailable, request_timing
from frontend.errors import NO_ENGINE_MESSAGE, APIError
from frontend.sampling_params import SamplingRequest
from frontend.serving.output import ChoiceDelta, ChoiceOutput
from protocol.messages import AddRequest, EmbedSpan, WireSamplingParams

# Engine requests of one API request in flight at once; the rest wait in the API process, costing nothing
# in the engines until they are admitted.
ADMIT_WINDOW = 256

logger = logging.getLogger(__name__)


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    text: str | None = None  # the prompt as text, for echo
    embeds: list[EmbedSpan] = field(default_factory=list)
    buffers: list[bytes] = field(default_factory=list)


@dataclass
class ChoiceJob:
    index: int  # choices[index] in the response
    prompt_index: int
    add: AddRequest
    buffers: list[bytes]
    output: ChoiceOutput


def plan_choices(
    request_id: str,
    prompts: list[PreparedPrompt],
    sampling: list[WireSamplingParams],
    n: int,
    make_output: Callable[[PreparedPrompt, int], ChoiceOutput],
    *,
    priority: int = 0,
    cache_salt: str | None = None,
    lora_name: str | None = None,
) -> list[ChoiceJob]:
    """One engine request per (prompt, sample), indexed prompt-major as OpenAI does."""
    jobs = []
    now = time.time()
    for p, prompt in enumerate(prompts):
        for i in range(n):
            params = sampling[p]
            if n > 1 and params.seed is not None:
                params = _with_seed(params, params.seed + i)  # distinct but reproducible samples
            index = p * n + i
            add = AddRequest(
                request_id=f"{request_id}-{index}",
                prompt_token_ids=prompt.token_ids,
                sampling=params,
                arrival_time=now,
                priority=priority,
                embeds=prompt.embeds,
                cache_salt=cache_salt,
                lora_name=lora_name,
            )
            jobs.append(ChoiceJob(index, p, add, prompt.buffers, make_output(prompt, p)))
    return jobs


def truncate_prompt(
    prompt: PreparedPrompt,
    keep: int | None,
    max_model_len: int,
    detokenize: Any,
    side: str | None = None,
) -> PreparedPrompt:
    """vLLM's `truncate_prompt_tokens`: keep the last `keep` prompt tokens (-1: the model's context), or
    the first ones with `truncation_side: "right"`."""
    if keep is None:
        return prompt
    if keep == -1:
        keep = max_model_len
    if len(prompt.token_ids) <= keep:
        return prompt
    if prompt.embeds:
        from frontend.errors import invalid_request

        raise invalid_request(
            "`truncate_prompt_tokens` cannot cut a prompt that carries prompt embeddings.",
            "truncate_prompt_tokens",
        )
    kept = prompt.token_ids[:keep] if side == "right" else prompt.token_ids[-keep:]
    return PreparedPrompt(kept, detokenize(kept))


def output_factory(
    tokenizer: Any, settings: SamplingRequest
) -> Callable[[PreparedPrompt, int], ChoiceOutput]:
    """Builds each choice's output processor from the request's stop and detokenization settings."""

    def make(prompt: PreparedPrompt, _index: int) -> ChoiceOutput:
        return ChoiceOutput(
            tokenizer,
            prompt.token_ids,
            stop=settings.stop,
            include_stop_str_in_output=settings.include_stop_str_in_output,
            skip_special_tokens=settings.skip_special_tokens,
        )

    return make


def _with_seed(params: WireSamplingParams, seed: int) -> WireSamplingParams:
    import msgspec

    return msgspec.structs.replace(params, seed=seed)


def _public_error(exc: Exception, request_id: str) -> tuple[str, int]:
    """(message, status) a client may see; an internal failure is logged with its request id instead."""
    if isinstance(exc, APIError):
        return exc.message, exc.status
    if isinstance(exc, EngineUnavailable):
        logger.warning("request %s: %s", request_id, exc)
        return NO_ENGINE_MESSAGE, 503
    logger.error("request %s failed", request_id, exc_info=exc)
    return (
        f"Internal server error while handling request {request_id}. The details are in the server log.",
        500,
    )


async def run_choices(
    client: EngineClient,
    jobs: list[ChoiceJob],
    *,
    admit_window: int = ADMIT_WINDOW,
    group: str | None = None,
    model_name: str = "",
) -> AsyncGenerator[tuple[ChoiceJob, ChoiceDelta], None]:
    """Deltas of all jobs as they arrive, each run on an engine of the model `group`. At most
    `admit_window` of them are in the engines at once (the next starts when one finishes), so one large
    fan-out neither floods the engine queues nor trips admission control. Cancelling the consumer aborts
    every unfinished engine request."""
    queue: asyncio.Queue[tuple[ChoiceJob, ChoiceDelta] | None] = asyncio.Queue()
    n = len(jobs) // max(len({job.prompt_index for job in jobs}), 1)  # choices per prompt, for metrics
    admitted = asyncio.Semaphore(admit_window)

    async def pump(job: ChoiceJob) -> None:
        try:
            timing = request_timing(job.add, model_name, n)
            stream = client.generate(job.add, job.buffers, timing=timing, group=group)
            try:
                async for delta in stream:
                    out = job.output.process(delta)
                    queue.put_nowait((job, out))
                    if job.output.finished and delta.finish_reason is None:
                        # A stop string ended it early: the metrics count it as "stop", and closing the
                        # stream aborts the engine request.
                        timing.finish_reason = job.output.finish_reason or "abort"
                        break
            finally:
                await stream.aclose()
        except Exception as exc:  # routed to the consumer as this choice's error, in public words
            job.output.error, job.output.error_status = _public_error(exc, job.add.request_id)
            queue.put_nowait(
                (job, ChoiceDelta("", [], error=job.output.error, error_status=job.output.error_status))
            )
        finally:
            queue.put_nowait(None)

    async def admit(job: ChoiceJob) -> None:
        async with admitted:
            await pump(job)

    tasks = [asyncio.create_task(admit(job)) for job in jobs]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
