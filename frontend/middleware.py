"""Pure-ASGI middleware: request ids and request logging, cancelling handlers whose client went away,
and API-key checks on every route but the open operational ones."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontend.errors import unauthorized
from frontend.sse import json_bytes

REQUEST_ID_KEY = "tandem.request_id"


class InFlightCounter(Protocol):
    num_requests_in_flight: int


request_logger = logging.getLogger("tandem.requests")
# The only routes served without the API key: probes, scrapers and load balancers cannot send one
# (/ping is SageMaker's probe), and the API's own description (vLLM leaves it open too).
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/load", "/ping", "/openapi.json", "/docs"})


class RequestIdMiddleware:
    """Every response carries X-Request-Id: the client's own, or a fresh one; one log line per request."""

    def __init__(self, app: ASGIApp, log_requests: bool = True) -> None:
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:256]
                break
        request_id = request_id or uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = request_id
        started = time.monotonic()
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log_requests:
                client = scope.get("client")
                request_logger.info(
                    "request %s %s %s from %s -> %s in %.3fs",
                    request_id,
                    scope.get("method"),
                    scope["path"],
                    f"{client[0]}:{client[1]}" if client else "?",
                    status if status is not None else "no response (client gone)",
                    time.monotonic() - started,
                )


class DisconnectMiddleware:
    """Cancels a POST handler as soon as its client disconnects, so the engine aborts its requests and
    frees their KV blocks at once. Streaming responses would notice on their next write; a non-streaming
    handler would otherwise generate to the end for nobody."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        gone = asyncio.Event()
        response_done = False

        async def app_receive() -> Message:
            if body_read.is_set():  # the watcher owns the channel from here on
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal response_done
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                response_done = True
            await send(message)

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and not response_done:
                handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        finally:
            for task in (handler, watcher):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


class InFlightMiddleware:
    """Counts the POST requests being handled (generation, embeddings, tokenization), for `/load`'s
    server_load: a load balancer's view of this API process. A streaming response counts until its
    last chunk is sent or its client goes."""

    def __init__(self, app: ASGIApp, state: InFlightCounter) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        self.state.num_requests_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.num_requests_in_flight -= 1


class ApiKeyMiddleware:
    """Bearer-token check with a constant-time compare on every request except the open operational routes.

    What is open is decided by the route the router would pick (same matcher, same root-path handling),
    never by the path's spelling: a prefix from --root-path, `//`, `..`, percent-encoding, a trailing slash,
    HEAD or OPTIONS all either match an open route exactly or need the key. Unknown paths need it too, so a
    client without the key learns nothing about which routes exist."""

    def __init__(self, app: ASGIApp, api_key: str, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_routes = [r for r in routes if isinstance(r, Route) and r.path in OPEN_PATHS]

    def _is_open(self, scope: Scope) -> bool:
        # Match.PARTIAL is a known path with the wrong method (405): that needs the key like anything else.
        return any(route.matches(scope)[0] == Match.FULL for route in self.open_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        err = unauthorized()
        body = json_bytes(err.body())
        await send(
            {
                "type": "http.response.start",
                "status": err.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
