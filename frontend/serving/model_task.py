"""Which endpoints a served model answers: generation models chat and complete, embedding models embed."""

from __future__ import annotations

from frontend.errors import invalid_request
from frontend.serving.model_context import ModelContext

_TASK_ENDPOINTS = {"generate": "text generation", "embed": "embeddings"}


def require_task(ctx: ModelContext, task: str, endpoint: str) -> None:
    """400 when the served model was started for another task (READY's `task`)."""
    served = ctx.ready.task
    if served == task:
        return
    hint = "start the server with `--task embed`" if task == "embed" else "start it without `--task embed`"
    raise invalid_request(
        f"{endpoint} needs a model served for {_TASK_ENDPOINTS.get(task, task)}, but "
        f"{ctx.model_name!r} is served for {_TASK_ENDPOINTS.get(served, served)}; {hint}.",
        "model",
    )
