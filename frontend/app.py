"""Builds the API process's Starlette app: routes, middleware, error handlers, engine client lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from frontend import openapi
from frontend.config import FrontendConfig
from frontend.engine_client import EngineClient, EngineUnavailable
from frontend.errors import NO_ENGINE_MESSAGE, APIError, engine_unavailable, internal_error
from frontend.limits import InputLimits
from frontend.metrics import setup_metrics, start_request_metrics
from frontend.middleware import REQUEST_ID_KEY, ApiKeyMiddleware, RequestMiddleware
from frontend.model_registry import ModelRegistry
from frontend.routes import extra_routes, lora_routes, openai_routes, sagemaker_routes, system_routes
from frontend.serving.streaming import json_response
from frontend.state import AppState
from protocol.messages import Ready

logger = logging.getLogger("tandem.api")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    headers = {}
    if exc.status == 503:
        headers["Retry-After"] = str(request.app.state.tandem.config.retry_after_s)
    response = json_response(exc.body(), exc.status)
    response.headers.update(headers)
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err = APIError(
            f"Route {request.method} {request.url.path} not found.",
            status=404,
            type="invalid_request_error",
            code="not_found",
        )
    elif exc.status_code == 405:
        err = APIError(
            f"Method {request.method} is not allowed on {request.url.path}.",
            status=405,
            code="method_not_allowed",
        )
    else:
        err = APIError(str(exc.detail), status=exc.status_code)
    return json_response(err.body(), err.status)


async def _unexpected(request: Request, exc: Exception) -> Response:
    request_id = request.scope.get(REQUEST_ID_KEY, "?")
    if isinstance(exc, EngineUnavailable):
        logger.warning("request %s: %s", request_id, exc)
        response = await _api_error(request, engine_unavailable(NO_ENGINE_MESSAGE))
    else:
        logger.exception("request %s failed", request_id)
        err = internal_error(request_id)
        response = json_response(err.body(), err.status)
    # Starlette answers unhandled errors outside the user middleware, so RequestMiddleware never
    # sees this response: set the header here.
    response.headers["X-Request-Id"] = request_id
    return response


def cors_credentials(config: FrontendConfig) -> bool:
    """Whether browsers may send cookies/credentials cross-origin: only when asked for, and never with the
    '*' wildcard (Starlette then echoes any Origin, even `null`, which would let every site act as the
    user)."""
    if not config.allow_credentials:
        return False
    if "*" in config.allowed_origins:
        logger.warning("--allow-credentials is ignored with --allowed-origins '*': list the origins instead")
        return False
    return True


def build_app(config: FrontendConfig) -> Starlette:
    client = EngineClient(
        list(config.engine_addresses),
        heartbeat_interval_s=config.heartbeat_interval_s,
        dead_after_s=config.engine_dead_after_s,
        curve_keys=_client_curve_keys(config),
    )
    models = ModelRegistry(InputLimits.from_config(config), config.served_model_names)
    state = AppState(config=config, client=client, models=models)
    setup_metrics(state)
    # Every handshake and adapter change (from any engine, at any time) updates the model table.
    client.on_engine_change = lambda conn: models.update(conn, client.engines)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await _wait_for_engine(client, config.engine_ready_timeout_s, state.stop_requested)
        default = state.model
        start_request_metrics(state, default.model_name, default.max_model_len)
        try:
            yield
        finally:
            state.accepting = False
            await client.close()

    middleware = [Middleware(RequestMiddleware, state=state, log_requests=not config.disable_log_requests)]
    if config.allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.allowed_origins),
                allow_methods=list(config.allowed_methods),
                allow_headers=list(config.allowed_headers),
                allow_credentials=cors_credentials(config),
            )
        )
    routes = [
        *openai_routes.routes,
        *extra_routes.routes,
        *lora_routes.routes,
        *system_routes.routes,
        *sagemaker_routes.routes_for(config),
        *openapi.routes,
    ]
    if config.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=config.api_key, routes=routes))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.tandem = state
    return app


async def _wait_for_engine(client: EngineClient, timeout_s: float, stop: threading.Event) -> Ready:
    """The first engine's READY, or an error as soon as the process is told to stop (uvicorn runs the
    lifespan before it looks at its own exit flag, so without this a SIGTERM waited for the engine)."""
    start = asyncio.ensure_future(client.start(timeout_s=timeout_s))
    while not start.done():
        if stop.is_set():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start  # let the cancelled task finish, so asyncio does not report it as lost
            await client.close()
            raise RuntimeError("asked to stop before any engine completed its handshake")
        await asyncio.wait({start}, timeout=0.1)
    return start.result()


def _client_curve_keys(config: FrontendConfig) -> dict[str, bytes]:
    if not config.curve_keys_dir:
        return {}
    from protocol.curve import load_client_keys

    return load_client_keys(config.curve_keys_dir)
