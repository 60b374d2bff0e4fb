"""Runs the engine requests behind one API request (n choices x prompts) and merges their deltas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

from frontend.engine_client import EngineClient, EngineUnavailable, request_timing
from frontend.errors import NO_ENGINE_MESSAGE, APIError
from frontend.serving.input_processor import ChoiceJob
from frontend.serving.output import ChoiceDelta

# Engine requests of one API request in flight at once; the rest wait in the API process, costing nothing
# in the engines until they are admitted.
ADMIT_WINDOW = 256

logger = logging.getLogger(__name__)


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
