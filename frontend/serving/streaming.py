"""Response helpers shared by the serving modules: JSON bodies, SSE streams, and peeking at the first
engine event so that a request refused up front (overload, bad input) gets a real HTTP status."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from starlette.responses import Response, StreamingResponse

from frontend.errors import APIError, choice_error
from frontend.serving.output import ChoiceDelta
from frontend.sse import SSE_DONE, json_bytes, sse_data, sse_error

T = TypeVar("T")


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
