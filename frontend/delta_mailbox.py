"""A request's inbox of engine deltas that stays small however slowly its reader reads: token deltas that
arrive while the reader is behind are merged into the one still waiting, not queued one by one."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

import msgspec

from protocol.messages import RequestDelta

Other = TypeVar("Other")  # what else a mailbox carries (the engine client's EngineLost)


def merge_deltas(first: RequestDelta, then: RequestDelta) -> RequestDelta:
    """One delta saying what `first` and `then` said in order (the output processor takes several tokens
    per delta: stop handling, detokenizing and logprobs work on lists)."""
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = (first.logprobs or []) + (then.logprobs or [])
    return msgspec.structs.replace(
        then,
        new_token_ids=first.new_token_ids + then.new_token_ids,
        logprobs=logprobs,
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else then.prompt_logprobs,
        num_prompt_tokens=first.num_prompt_tokens or then.num_prompt_tokens,
        queue_time_s=first.queue_time_s if first.queue_time_s is not None else then.queue_time_s,
    )


class DeltaMailbox(Generic[Other]):
    """asyncio.Queue's put_nowait / get for one request. Holds at most one unfinished delta (merged) plus
    what ends the request (a final or error delta, or an Other), so its memory is bounded by the tokens
    themselves, never by how many steps the reader missed."""

    def __init__(self) -> None:
        self._items: deque[RequestDelta | Other] = deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def num_tokens(self) -> int:
        """Tokens waiting to be read (for tests and introspection)."""
        return sum(len(i.new_token_ids) for i in self._items if isinstance(i, RequestDelta))

    def put_nowait(self, item: RequestDelta | Other) -> None:
        last = self._items[-1] if self._items else None
        if (
            isinstance(item, RequestDelta)
            and isinstance(last, RequestDelta)
            and last.finish_reason is None
            and item.error is None
        ):
            self._items[-1] = merge_deltas(last, item)
            return
        self._items.append(item)
        self._ready.set()

    async def get(self) -> RequestDelta | Other:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()
