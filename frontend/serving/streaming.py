"""Response helpers shared by the serving modules: JSON bodies, SSE streams, and peeking at the first
engine event so that a request refused up front (overload, bad input) gets a real HTTP status."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from starlette.responses import Response, StreamingResponse

from frontend.errors import APIError, choice_error
from frontend.serving.generation import ChoiceJob, usage_dict
from frontend.serving.output import ChoiceDelta
from frontend.sse import SSE_DONE, json_bytes, sse_data, sse_error

T = TypeVar("T")


def usage_flags(stream_options: Any) -> tuple[bool, bool]:
    """(final usage chunk, usage on every chunk); as vLLM, per-chunk usage only with the final one."""
    include_usage = bool(stream_options and stream_options.include_usage)
    return include_usage, include_usage and bool(stream_options.continuous_usage_stats)


class StreamUsage:
    """What a stream has told the client so far: `continuous_usage_stats` counts and `return_token_ids`.

    The choices' outputs run ahead of the stream (their deltas are processed as they arrive, before
    the consumer writes them), so each chunk's usage counts only the deltas consumed up to it: the
    role chunk reports 0 completion tokens and later counts grow with every chunk. Token ids of deltas
    that produced no chunk (text held back) go out with the choice's next chunk.
    """

    def __init__(self, jobs: list[ChoiceJob]) -> None:
        self.jobs = jobs
        self.num_completion_tokens = 0
        self.pending_ids: dict[int, list[int]] = {job.index: [] for job in jobs}

    def add(self, index: int, delta: ChoiceDelta) -> None:
        self.num_completion_tokens += len(delta.token_ids)
        self.pending_ids[index].extend(delta.token_ids)

    def take_token_ids(self, index: int) -> list[int]:
        ids, self.pending_ids[index] = self.pending_ids[index], []
        return ids

    def current(self) -> dict[str, Any]:
        usage = usage_dict(self.jobs)
        usage["completion_tokens"] = self.num_completion_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + self.num_completion_tokens
        return usage


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json_bytes(body), status_code=status, media_type="application/json")


async def first_or_error(
    events: AsyncGenerator[tuple[Any, ChoiceDelta], None],
) -> AsyncGenerator[tuple[Any, ChoiceDelta], None]:
    """Waits for the first event; raises its error as an APIError (-> HTTP status) if the engine refused it."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        return _empty()
    _, delta = first
    if delta.error:
        await events.aclose()
        raise choice_error(delta.error, delta.error_status)
    return _chain(first, events)


async def _empty() -> AsyncGenerator[tuple[Any, ChoiceDelta], None]:
    return
    yield  # pragma: no cover


async def _chain(first: T, rest: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


def sse_response(chunks: AsyncIterator[dict[str, Any] | APIError]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if isinstance(chunk, APIError):
                yield sse_error(chunk)
                break
            yield sse_data(json_bytes(chunk))
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
