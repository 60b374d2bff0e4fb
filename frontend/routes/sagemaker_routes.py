"""vLLM's deployment routes: SageMaker's `POST /invocations` (one URL for every request kind, routed by
the body's shape) and `GET /ping`, and `GET /tokenizer_info` behind `--enable-tokenizer-info-endpoint`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from frontend.config import FrontendConfig
from frontend.errors import invalid_request
from frontend.request_body import read_body
from frontend.routes.extra_routes import embeddings_from_body
from frontend.routes.openai_routes import chat_from_body, completion_from_body
from frontend.routes.system_routes import health
from frontend.serving.model_context import ModelContext
from frontend.serving.streaming import json_response
from frontend.state import AppState

BodyHandler = Callable[[Request, bytes], Awaitable[Response]]

# (the body field that marks the kind, its handler, the request type's name), tried in vLLM's order:
# chat, then completions, then embeddings. A generation server answers the first two, `--task embed`
# the last, as vLLM offers only the handlers its model supports.
_KINDS: dict[str, list[tuple[str, BodyHandler, str]]] = {
    "generate": [
        ("messages", chat_from_body, "ChatCompletionRequest"),
        ("prompt", completion_from_body, "CompletionRequest"),
    ],
    "embed": [("input", embeddings_from_body, "EmbeddingRequest")],
}


def _state(request: Request) -> AppState:
    return request.app.state.tandem


async def invocations(request: Request) -> Response:
    """The body goes to the first endpoint whose request kind it has; that endpoint then validates it
    exactly as it would on its own URL (so a bad field is a 400 naming that field)."""
    state = _state(request)
    body = await read_body(request, state.config.max_request_body_bytes)
    try:
        fields = msgspec.json.decode(body)
    except msgspec.DecodeError as err:
        raise invalid_request(f"Invalid JSON body: {err}") from None
    model = fields.get("model") if isinstance(fields, dict) else None
    kinds = _KINDS.get(state.context_for(model if isinstance(model, str) else None).ready.task, [])
    if isinstance(fields, dict):
        for marker, handler, _name in kinds:
            if marker in fields:
                return await handler(request, body)
    names = ", ".join(name for _marker, _handler, name in kinds)
    raise invalid_request(f"Cannot find suitable handler for request. Expected one of: [{names}]")


def tokenizer_info(ctx: ModelContext) -> dict[str, Any]:
    """The tokenizer's configuration in Hugging Face's tokenizer_config.json terms, from what the READY
    handshake carried (vLLM returns the tokenizer's init arguments; there are no files here)."""
    ready = ctx.ready
    added = ctx.tokenizer.get_added_tokens_decoder()
    info: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": ready.max_model_len,
        "vocab_size": ctx.tokenizer.get_vocab_size(with_added_tokens=True),
        "bos_token": ready.bos_token,
        "eos_token": ready.eos_token,
        "add_bos_token": ready.add_bos_token,
        "chat_template": ready.chat_template,
        "added_tokens_decoder": {
            str(token_id): {
                "content": token.content,
                "lstrip": token.lstrip,
                "rstrip": token.rstrip,
                "normalized": token.normalized,
                "single_word": token.single_word,
                "special": token.special,
            }
            for token_id, token in sorted(added.items())
        },
    }
    for name, token in ready.special_tokens.items():  # pad_token, unk_token, ... under their own keys
        info.setdefault(name if name.endswith("_token") else f"{name}_token", token)
    return info


async def tokenizer_info_route(request: Request) -> Response:
    # `?model=` picks one of several served models; without it, the default model.
    return json_response(tokenizer_info(_state(request).context_for(request.query_params.get("model"))))


def routes_for(config: FrontendConfig) -> list[Route]:
    routes = [
        Route("/invocations", invocations, methods=["POST"]),
        Route("/ping", health, methods=["GET", "POST"]),  # SageMaker's health check
    ]
    if config.enable_tokenizer_info_endpoint:  # off by default, as in vLLM: it exposes the template
        routes.append(Route("/tokenizer_info", tokenizer_info_route, methods=["GET"]))
    return routes
