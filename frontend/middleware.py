"""Pure-ASGI middleware: request ids and request logging, in-flight counting and cancelling handlers
whose client went away (one layer), and API-key checks on every route but the open operational ones."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Sequence
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


class RequestMiddleware:
    """What every request goes through, in one layer (each ASGI layer costs a call per message sent):

    - request ids: every response carries X-Request-Id, the client's own or a fresh one, and one log
      line per request (unless disabled);
    - disconnects: a POST handler is cancelled as soon as its client goes, so the engine aborts its
      requests and frees their KV blocks at once (a non-streaming handler would otherwise generate to
      the end for nobody);
    - in-flight count: the POST requests being handled (generation, embeddings, tokenization), for
      `/load`'s server_load, a load balancer's view of this API process; a streaming response counts
      until its last chunk is sent or its client goes.

    Because the disconnect watch below cancels the handler, POST handlers see ASGI spec 2.4: a
    StreamingResponse then streams without a listener task of its own (a task group per response, ~10%
    of the API process's CPU per streamed request)."""

    def __init__(self, app: ASGIApp, state: InFlightCounter, log_requests: bool = True) -> None:
        self.app = app
        self.state = state
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
        response_done = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_done
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            elif not message.get("more_body", False):
                response_done = True
            await send(message)

        try:
            if scope.get("method") == "POST":
                self.state.num_requests_in_flight += 1
                try:
                    await _cancel_on_disconnect(self.app, scope, receive, send_with_id, lambda: response_done)
                finally:
                    self.state.num_requests_in_flight -= 1
            else:
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


async def _cancel_on_disconnect(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, response_done: Callable[[], bool]
) -> None:
    """Runs `app` in this task; once the request body is read, a watcher task owns `receive` and
    cancels this task when the client disconnects before the response is complete."""
    task = asyncio.current_task()
    assert task is not None
    gone = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    cancelled_here = False

    async def watch() -> None:
        nonlocal cancelled_here
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
        if not response_done():
            cancelled_here = True
            task.cancel()

    async def app_receive() -> Message:
        nonlocal watcher
        if watcher is not None:  # the watcher owns the channel from here on
            await gone.wait()
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
        elif not message.get("more_body", False):
            watcher = asyncio.ensure_future(watch())
        return message

    # The watcher stands in for the response's own disconnect listener (ASGI 2.4: a send after the
    # client went is dropped by the server, and this task is cancelled right away).
    scope["asgi"] = {**scope.get("asgi", {}), "spec_version": "2.4"}
    try:
        await app(scope, app_receive, send)
    except asyncio.CancelledError:
        if not cancelled_here:
            raise
        # Ours, for a client that went: the request ends here, quietly, unless the server cancelled
        # this task too (shutdown).
        cancelled_here = False
        if task.uncancel() > 0:
            raise
    finally:
        if cancelled_here:  # delivered, but the app swallowed it
            task.uncancel()
        if watcher is not None and not watcher.done():
            watcher.cancel()


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
