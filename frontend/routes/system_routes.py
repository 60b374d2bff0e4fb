"""Operational routes: health, version, load and Prometheus metrics."""

from __future__ import annotations

import importlib.metadata

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from frontend.serving.streaming import json_response
from frontend.state import AppState

# pyproject.toml is the one place the version is written; a source tree that was never installed has none.
try:
    TANDEM_VERSION = importlib.metadata.version("tandem")
except importlib.metadata.PackageNotFoundError:
    TANDEM_VERSION = "0+unknown"


def _state(request: Request) -> AppState:
    return request.app.state.tandem


async def health(request: Request) -> Response:
    """200 while the process accepts requests and at least one model has a live engine, else 503 (as
    vLLM's /health). The body tells each model's state, so a probe can see one model down while
    the others serve."""
    state = _state(request)
    models = state.models.health(state.client.engines)
    healthy = state.ctx is not None and state.accepting and any(m["healthy"] for m in models.values())
    body = {"status": "ok" if healthy else "unavailable", "accepting": state.accepting, "models": models}
    return json_response(body, 200 if healthy else 503)


async def version(_request: Request) -> Response:
    return json_response({"version": TANDEM_VERSION})


async def load(request: Request) -> Response:
    state = _state(request)
    engines = [
        {
            "address": c.address,
            "model": c.group,  # the model it serves (its first announced name); None before its handshake
            "alive": c.alive,
            "outstanding": len(c.pending),
            "num_running": c.stats.num_running if c.stats else None,
            "num_waiting": c.stats.num_waiting if c.stats else None,
            "max_step_num_seqs": c.stats.max_step_num_seqs if c.stats else None,
            "num_served": c.num_served,
            "engine_id": c.ready.engine_id if c.ready else None,
            "num_kv_blocks": c.ready.num_kv_blocks if c.ready else None,
            "num_free_blocks": c.stats.num_free_blocks if c.stats else None,
            "kv_cache_usage": c.stats.kv_cache_usage if c.stats else None,
            "num_bad_messages": c.stats.num_bad_messages if c.stats else None,
        }
        for c in state.client.engines
    ]
    return json_response({"server_load": state.num_requests_in_flight, "engines": engines})


async def metrics(request: Request) -> Response:
    from frontend.metrics import render_metrics

    body, content_type = render_metrics(_state(request))
    return Response(body, media_type=content_type)


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/version", version, methods=["GET"]),
    Route("/load", load, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
