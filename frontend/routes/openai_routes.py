"""OpenAI-compatible model routes: chat completions, completions, models."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from frontend.middleware import REQUEST_ID_KEY
from frontend.request_body import read_body
from frontend.schemas import decode_chat_request, decode_completion_request
from frontend.serving.chat import create_chat_completion
from frontend.serving.completions import create_completion
from frontend.serving.streaming import json_response
from frontend.serving.tools import ToolSettings
from frontend.state import AppState


def _state(request: Request) -> AppState:
    return request.app.state.tandem


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    req = decode_chat_request(await read_body(request, state.config.max_request_body_bytes))
    tools = ToolSettings(state.config.enable_auto_tool_choice, state.config.tool_call_parser)
    return await create_chat_completion(
        state.model, state.client, req, request.scope[REQUEST_ID_KEY], tool_settings=tools
    )


async def completions(request: Request) -> Response:
    state = _state(request)
    req = decode_completion_request(await read_body(request, state.config.max_request_body_bytes))
    return await create_completion(state.model, state.client, req, request.scope[REQUEST_ID_KEY])


async def list_models(request: Request) -> Response:
    ctx = _state(request).model
    created = int(time.time())
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "tandem",
            "root": ctx.served_model_names[0],
            "parent": None,
            "max_model_len": ctx.max_model_len,
        }
        for name in ctx.served_model_names
    ]
    return json_response({"object": "list", "data": data})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
