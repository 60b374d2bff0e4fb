"""The skeleton every generating endpoint shares: its engine jobs are started, then the answer is one
JSON body or an SSE stream, built by the endpoint from a `ResponseContext`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from frontend.engine_client import EngineClient
from frontend.errors import APIError, choice_error
from frontend.sampling_params import SamplingRequest
from frontend.serving.generation import run_choices
from frontend.serving.input_processor import ChoiceJob, PreparedPrompt
from frontend.serving.output import ChoiceDelta, output_factory
from frontend.serving.streaming import first_or_error, json_response, sse_response
from protocol.messages import WireSamplingParams

if TYPE_CHECKING:
    from frontend.serving.model_context import ModelContext
    from frontend.serving.tools import ToolPlan

Events = AsyncIterator[tuple[ChoiceJob, ChoiceDelta]]
Chunks = AsyncIterator[dict[str, Any] | APIError]


@dataclass
class ResponseContext:
    """One API request in flight: the body it came with, its choices' jobs and their events, and the
    fields every answer repeats."""

    req: Any  # the decoded body (chat, completion, generate)
    prompts: list[PreparedPrompt]
    jobs: list[ChoiceJob]
    events: Events
    response_id: str
    model: str  # the served name to answer with
    created: int
    tool_plan: ToolPlan | None = None

    async def wait(self) -> None:
        """Runs every choice to its end; a failed choice raises its error (-> the HTTP status)."""
        async for _job, delta in self.events:
            if delta.error:
                raise choice_error(delta.error, delta.error_status)


async def start_response(
    ctx: ModelContext,
    client: EngineClient,
    req: Any,
    prompts: list[PreparedPrompt],
    sampling: list[WireSamplingParams],
    settings: SamplingRequest,
    *,
    response_id: str,
    model: str,
    n: int = 1,
    job_prefix: str | None = None,
    tool_plan: ToolPlan | None = None,
) -> ResponseContext:
    """Sends the engine requests (n per prompt, job ids from `job_prefix`, by default the response id)
    and waits for the first event, so that a request refused up front gets a real HTTP status."""
    jobs = ctx.inputs.jobs(
        job_prefix or response_id,
        prompts,
        sampling,
        n,
        output_factory(ctx.tokenizer, settings),
        priority=req.priority or 0,
        cache_salt=req.cache_salt,
    )
    created = int(time.time())
    events = await first_or_error(run_choices(client, jobs, group=ctx.group, model_name=ctx.model_name))
    return ResponseContext(req, prompts, jobs, events, response_id, model, created, tool_plan)


async def respond(
    rc: ResponseContext,
    collect: Callable[[ResponseContext], Awaitable[dict[str, Any]]],
    stream: Callable[[ResponseContext], Chunks],
) -> Response:
    """The endpoint's SSE stream when the body asked for one, else its whole JSON answer."""
    if rc.req.stream:
        return sse_response(stream(rc))
    return json_response(await collect(rc))
