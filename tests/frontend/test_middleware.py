"""RequestMiddleware through a real uvicorn server and real sockets: request ids, the in-flight count, and
a client that goes away mid-request cancelling its handler (streaming or not) without an error logged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from frontend.middleware import REQUEST_ID_KEY, RequestMiddleware

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Probe:
    num_requests_in_flight: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    chunks_sent: int = 0


def build(probe: Probe) -> Starlette:
    async def echo_id(request: Request) -> Response:
        return JSONResponse({"id": request.scope[REQUEST_ID_KEY], "in_flight": probe.num_requests_in_flight})

    async def hang(request: Request) -> Response:
        await request.body()
        probe.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        return Response(b"never")

    async def stream(request: Request) -> Response:
        await request.body()

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    probe.chunks_sent += 1
                    probe.started.set()
                    yield b"data: tick\n\n"
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                probe.cancelled.set()
                raise

        return StreamingResponse(chunks(), media_type="text/event-stream")

    routes = [
        Route("/id", echo_id, methods=["GET", "POST"]),
        Route("/hang", hang, methods=["POST"]),
        Route("/stream", stream, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(RequestMiddleware, state=probe)])


@contextlib.asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def raw_request(port: int, method: str, path: str, headers: str = "") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n{headers}\r\n{{}}".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head


async def test_every_response_carries_the_clients_request_id_or_a_fresh_one() -> None:
    probe = Probe()
    async with running(build(probe)) as port:
        given = await raw_request(port, "GET", "/id", "X-Request-Id: ops-42\r\n")
        fresh = await raw_request(port, "POST", "/id")
    assert b"x-request-id: ops-42\r\n" in given.lower()
    assert b"x-request-id: " in fresh.lower() and b"ops-42" not in fresh


async def test_a_post_counts_in_flight_while_handled_and_a_get_does_not() -> None:
    probe = Probe()
    async with running(build(probe)) as port:
        for method, expected in (("POST", b'"in_flight":1'), ("GET", b'"in_flight":0')):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"{method} /id HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
            await reader.readuntil(b"\r\n\r\n")
            assert expected in await reader.read(1000)
            writer.close()
    assert probe.num_requests_in_flight == 0


@pytest.mark.parametrize("path", ["/hang", "/stream"])
async def test_a_client_that_goes_cancels_its_handler_quietly(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()
    async with running(build(probe)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode())
        await asyncio.wait_for(probe.started.wait(), 10)
        if path == "/stream":
            await reader.readuntil(b"data: tick")
        assert probe.num_requests_in_flight == 1
        with caplog.at_level(logging.ERROR):
            writer.close()
            await asyncio.wait_for(probe.cancelled.wait(), 10)
            sent = probe.chunks_sent
            await asyncio.sleep(0.1)
    assert probe.num_requests_in_flight == 0
    assert probe.chunks_sent == sent  # nothing more was produced for nobody
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
