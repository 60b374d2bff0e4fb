"""Runs CPU-heavy request preparation (big tokenizations, chat templates, grammar checks, prompt-embeds
decoding) on worker threads, so one large request never stalls the event loop and the readiness probe.

Small inputs stay inline: a thread hop costs more than encoding a short prompt.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Inputs above this many bytes/characters go to a worker thread.
OFFLOAD_MIN_SIZE = 64 * 1024

# A few threads: the tokenizers library and numpy release the GIL, pure-Python work (jinja) interleaves
# with the loop at the interpreter's switch interval; more threads would only contend for the two cores.
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tandem-prepare")


async def run_off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on a worker thread; exceptions (APIError included) propagate to the caller."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()  # log records made in the worker keep the request's context
    return await loop.run_in_executor(_pool, functools.partial(context.run, fn, *args, **kwargs))


async def run_sized(size: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn` inline when the input is small (`size` below OFFLOAD_MIN_SIZE), else on a worker thread."""
    if size < OFFLOAD_MIN_SIZE:
        return fn(*args, **kwargs)
    return await run_off_loop(fn, *args, **kwargs)
