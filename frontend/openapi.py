"""GET /openapi.json and /docs: the API described from the request structs themselves (msgspec's JSON
schema), so the description cannot drift from what the server decodes."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from frontend.serving.streaming import json_response

TANDEM_VERSION = "0.1.0"
_REF = "#/components/schemas/{name}"


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """OpenAI's error envelope, the body of every 4xx and 5xx answer."""

    error: ErrorDetail


def request_bodies() -> dict[str, tuple[str, Any]]:
    """Every POST route -> (summary, the struct its body decodes into). A POST route missing here fails
    tests/e2e/test_openapi.py, so new routes get described."""
    from frontend.routes.lora_routes import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
    from frontend.schemas import ChatCompletionRequest, CompletionRequest
    from frontend.serving.batch_chat import batch_chat_decoder
    from frontend.serving.embeddings import embedding_decoder
    from frontend.serving.generate import generate_decoder
    from frontend.serving.tokenize import detokenize_decoder, tokenize_decoder

    return {
        "/v1/chat/completions": ("Chat completion (OpenAI)", ChatCompletionRequest),
        "/v1/completions": ("Text completion (OpenAI)", CompletionRequest),
        "/v1/chat/completions/batch": (
            "Several conversations in one request (vLLM)",
            batch_chat_decoder.type,
        ),
        "/inference/v1/generate": ("Tokens in, tokens out (vLLM)", generate_decoder.type),
        "/tokenize": ("Tokenize a prompt or a chat (vLLM)", tokenize_decoder.type),
        "/detokenize": ("Token ids to text (vLLM)", detokenize_decoder.type),
        "/v1/embeddings": ("Embeddings (OpenAI, --task embed)", embedding_decoder.type),
        # SageMaker-style: the body's shape picks the endpoint (chat, completions or embeddings).
        "/invocations": (
            "Chat, completion or embedding, chosen by the body's fields (SageMaker, vLLM)",
            (ChatCompletionRequest, CompletionRequest, embedding_decoder.type),
        ),
        # Only with an engine started with --enable-lora; answer in plain text on success (as vLLM).
        "/v1/load_lora_adapter": ("Load a LoRA adapter (vLLM, --enable-lora)", LoadLoraAdapterRequest),
        "/v1/unload_lora_adapter": ("Unload a LoRA adapter (vLLM, --enable-lora)", UnloadLoraAdapterRequest),
    }


# POST routes that take no body (SageMaker's health check accepts POST as well as GET).
BODYLESS_POST_ROUTES = frozenset({"/ping"})


def _body_types(body: Any) -> list[Any]:
    """The structs a body may decode into: one, or several for a route that dispatches on shape."""
    return list(body) if isinstance(body, tuple) else [body]


def _error_responses() -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": _REF.format(name="ErrorResponse")}}}
    return {
        status: {"description": description, "content": error}
        for status, description in (
            ("400", "Invalid request: the `param` names the field"),
            ("401", "Missing or wrong API key"),
            ("404", "Unknown model or route"),
            ("413", "Body over --max-request-body-bytes"),
            ("503", "Overloaded or no engine available (Retry-After)"),
        )
    }


def build_openapi(routes: list[Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes` (the app's Starlette routes)."""
    bodies = request_bodies()
    names = sorted(bodies)
    types = [t for path in names for t in _body_types(bodies[path][1])]
    refs, components = msgspec.json.schema_components([*types, ErrorResponse], ref_template=_REF)
    body_refs: dict[str, Any] = {}
    position = 0
    for path in names:
        count = len(_body_types(bodies[path][1]))
        path_refs = list(refs[position : position + count])
        body_refs[path] = path_refs[0] if count == 1 else {"oneOf": path_refs}
        position += count
    paths: dict[str, Any] = {}
    for route in routes:
        if not isinstance(route, Route) or route.path in ("/openapi.json", "/docs"):
            continue
        # Starlette's `{name:convertor}` is OpenAPI's `{name}`; every such segment is a path parameter.
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        path_params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.param_convertors
        ]
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation: dict[str, Any] = {
                "operationId": f"{method.lower()}_{route.name}",
                "responses": {"200": {"description": "Success"}, **_error_responses()},
            }
            if path_params:
                operation["parameters"] = path_params
            if method == "POST" and route.path in bodies:
                operation["summary"] = bodies[route.path][0]
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": body_refs[route.path]}},
                }
            else:
                operation["summary"] = (route.endpoint.__doc__ or route.name).strip().splitlines()[0]
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tandem", "version": TANDEM_VERSION, "description": "OpenAI-compatible LLM server"},
        "paths": paths,
        "components": {"schemas": components},
    }


async def openapi_json(request: Request) -> Response:
    app_state = request.app.state
    document = getattr(app_state, "openapi_document", None)
    if document is None:  # built once per process: the routes never change after start-up
        document = build_openapi(request.app.routes)
        app_state.openapi_document = document
    return json_response(document)


_DOCS_PAGE = """<!doctype html>
<html><head><title>Tandem API</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""


async def docs(_request: Request) -> Response:
    """Swagger UI over /openapi.json (the UI's script and style come from a CDN, as FastAPI's do)."""
    return HTMLResponse(_DOCS_PAGE)


routes = [
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
]
