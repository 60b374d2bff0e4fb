"""A minimal HTTP/1.1 client for streamed (SSE) POSTs over one keep-alive connection, for load generators
that share a small machine with the server: it parses only what a streamed answer needs (status line,
headers, chunked transfer coding), so it costs a fraction of httpx's CPU per request and leaves the cores
to the process being measured."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any


class HTTPStatusError(RuntimeError):
    pass


class RawSSEConnection:
    """One keep-alive connection; `stream_post` may be awaited again once the previous one returned."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host

    @classmethod
    async def open(cls, host: str, port: int) -> RawSSEConnection:
        reader, writer = await asyncio.open_connection(host, port, limit=2**20)
        return cls(reader, writer, f"{host}:{port}")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def stream_post(
        self, path: str, body: dict[str, Any], counted: Callable[[bytes], bool]
    ) -> list[float]:
        """POSTs `body` as JSON and reads the whole streamed answer; returns when (time.monotonic) each
        SSE event for which `counted(event)` is true arrived (this server writes whole events per chunk)."""
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        self.writer.write(head + payload)
        reader = self.reader
        status_line = await reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        chunked, length = False, 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"content-length":
                length = int(value)
        if not chunked:
            data = await reader.readexactly(length)
            if status != 200:
                raise HTTPStatusError(f"HTTP {status}: {data[:200]!r}")
            return [time.monotonic()] if counted(data) else []
        if status != 200:
            raise HTTPStatusError(f"HTTP {status}")
        times = []
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                return times
            now = time.monotonic()
            times.extend(now for event in data.split(b"\n\n") if counted(event))
