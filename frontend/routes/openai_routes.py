"""OpenAI-compatible model routes: chat completions, completions, models."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from frontend.errors import model_not_found
from frontend.middleware import REQUEST_ID_KEY
from frontend.request_body import read_body
from frontend.schemas import decode_chat_request, decode_completion_request
from frontend.serving.chat import create_chat_completion
from frontend.serving.completions import create_completion
from frontend.serving.model_context import ModelContext
from frontend.serving.streaming import json_response
from frontend.serving.tools import ToolSettings
from frontend.state import AppState
from protocol.messages import LoraAdapter


def _state(request: Request) -> AppState:
    return request.app.state.tandem


async def chat_from_body(request: Request, body: bytes) -> Response:
    state = _state(request)
    req = decode_chat_request(body)
    tools = ToolSettings.from_config(state.config)
    return await create_chat_completion(
        state.context_for(req.model), state.client, req, request.scope[REQUEST_ID_KEY], tool_settings=tools
    )


async def completion_from_body(request: Request, body: bytes) -> Response:
    state = _state(request)
    req = decode_completion_request(body)
    ctx = state.context_for(req.model)
    return await create_completion(ctx, state.client, req, request.scope[REQUEST_ID_KEY])


async def chat_completions(request: Request) -> Response:
    body = await read_body(request, _state(request).config.max_request_body_bytes)
    return await chat_from_body(request, body)


async def completions(request: Request) -> Response:
    body = await read_body(request, _state(request).config.max_request_body_bytes)
    return await completion_from_body(request, body)


def _model_card(ctx: ModelContext, name: str, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "tandem",
        "root": ctx.served_model_names[0],
        "parent": None,
        "max_model_len": ctx.max_model_len,
    }


def _adapter_card(adapter: LoraAdapter, base: ModelContext, created: int) -> dict[str, Any]:
    # vLLM's shape for a LoRA adapter: root is the adapter's folder, parent the model it extends.
    return {
        "id": adapter.name,
        "object": "model",
        "created": created,
        "owned_by": "tandem",
        "root": adapter.path,
        "parent": base.model_name,
        "max_model_len": None,
    }


def _cards(state: AppState) -> dict[str, dict[str, Any]]:
    """Every model card by id: each model's served names (the default model first), then adapters."""
    state.models.resolve(None)  # 503 while no engine has answered yet
    created = int(time.time())
    cards = {
        name: _model_card(ctx, name, created)
        for ctx in state.models.models_in_order()
        for name in ctx.served_model_names
    }
    for name, (adapter, view) in state.models.adapters.items():
        cards.setdefault(name, _adapter_card(adapter, view, created))
    return cards


async def list_models(request: Request) -> Response:
    return json_response({"object": "list", "data": list(_cards(_state(request)).values())})


async def retrieve_model(request: Request) -> Response:
    """OpenAI's `GET /v1/models/{model}`: one model card, or a 404 in the error envelope."""
    name = request.path_params["model"]
    card = _cards(_state(request)).get(name)
    if card is None:
        raise model_not_found(name)
    return json_response(card)


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    # `path`: served names such as "org/model" contain slashes.
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
]
