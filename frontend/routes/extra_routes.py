"""vLLM's extra routes: batch chat, tokens-in/tokens-out generate, tokenize/detokenize, embeddings."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from frontend.middleware import REQUEST_ID_KEY
from frontend.offload import run_off_loop
from frontend.request_body import read_body
from frontend.schemas import _decode as decode_body
from frontend.serving.batch_chat import batch_chat_decoder, create_batch_chat_completion
from frontend.serving.embeddings import create_embeddings, embedding_decoder
from frontend.serving.generate import create_generate, generate_decoder
from frontend.serving.streaming import json_response
from frontend.serving.tokenize import detokenize, detokenize_decoder, tokenize, tokenize_decoder
from frontend.serving.tools import ToolSettings
from frontend.state import AppState


def _state(request: Request) -> AppState:
    return request.app.state.tandem


async def _body(request: Request) -> bytes:
    return await read_body(request, _state(request).config.max_request_body_bytes)


async def batch_chat_completions(request: Request) -> Response:
    state = _state(request)
    req = decode_body(batch_chat_decoder, await _body(request))
    tools = ToolSettings.from_config(state.config)
    return await create_batch_chat_completion(
        state.context_for(req.model), state.client, req, request.scope[REQUEST_ID_KEY], tool_settings=tools
    )


async def generate(request: Request) -> Response:
    state = _state(request)
    req = decode_body(generate_decoder, await _body(request))
    ctx = state.context_for(req.model)
    return await create_generate(ctx, state.client, req, request.scope[REQUEST_ID_KEY])


async def tokenize_route(request: Request) -> Response:
    req = decode_body(tokenize_decoder, await _body(request))
    return json_response(await run_off_loop(tokenize, _state(request).context_for(req.model), req))


async def detokenize_route(request: Request) -> Response:
    req = decode_body(detokenize_decoder, await _body(request))
    return json_response(detokenize(_state(request).context_for(req.model), req))


async def embeddings_from_body(request: Request, body: bytes) -> Response:
    state = _state(request)
    req = decode_body(embedding_decoder, body)
    ctx = state.context_for(req.model)
    return await create_embeddings(ctx, state.client, req, request.scope[REQUEST_ID_KEY])


async def embeddings(request: Request) -> Response:
    return await embeddings_from_body(request, await _body(request))


routes = [
    Route("/v1/chat/completions/batch", batch_chat_completions, methods=["POST"]),
    Route("/inference/v1/generate", generate, methods=["POST"]),
    Route("/tokenize", tokenize_route, methods=["POST"]),
    Route("/detokenize", detokenize_route, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
