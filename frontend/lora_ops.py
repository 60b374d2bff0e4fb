"""Runtime adapter operations (POST /v1/load_lora_adapter, /v1/unload_lora_adapter) as the engine client
runs them: one LoadLora / UnloadLora per engine under its own op id, a future per op that the engine's
LoraResult resolves, and a 503 result for an engine that is lost, unreachable or silent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from protocol.framing import encode
from protocol.messages import LoadLora, LoraResult, UnloadLora

if TYPE_CHECKING:
    from frontend.engine_client import EngineConnection

logger = logging.getLogger(__name__)

# Sends one message's frames to an engine; False when it could not be sent.
SendFrames = Callable[["EngineConnection", list[bytes | memoryview]], bool]


class LoraOps:
    def __init__(self) -> None:
        self._waiters: dict[str, asyncio.Future[LoraResult]] = {}  # op id -> the asker's future

    def __len__(self) -> int:
        """Operations still waiting for an engine's answer."""
        return len(self._waiters)

    async def run(
        self,
        conns: Sequence[EngineConnection],
        message: LoadLora | UnloadLora,
        timeout_s: float,
        send: SendFrames,
    ) -> list[LoraResult]:
        """Sends the operation to each engine and waits for every LoraResult (one per engine, in order)."""
        waiters: list[tuple[EngineConnection, str, asyncio.Future[LoraResult]]] = []
        loop = asyncio.get_running_loop()
        for conn in conns:
            op_id = f"{message.op_id}-{conn.index}"
            waiter: asyncio.Future[LoraResult] = loop.create_future()
            self._waiters[op_id] = waiter
            waiters.append((conn, op_id, waiter))
            if isinstance(message, LoadLora):
                sent = send(conn, encode(LoadLora(op_id, message.adapter)))
            else:
                sent = send(conn, encode(UnloadLora(op_id, message.name)))
            if not sent:
                self._waiters.pop(op_id, None)
                waiter.set_result(_failure(op_id, conn, "the request could not be sent to the engine"))
        await asyncio.wait([w for _, _, w in waiters], timeout=timeout_s)
        results = []
        for conn, op_id, waiter in waiters:
            self._waiters.pop(op_id, None)
            if waiter.done():
                results.append(waiter.result())
            else:
                waiter.cancel()
                results.append(_failure(op_id, conn, f"the engine did not answer within {timeout_s:.0f} s"))
        return results

    def resolve(self, result: LoraResult) -> None:
        """An engine's answer: completes the asker's operation (results for others' ops are ignored)."""
        waiter = self._waiters.pop(result.op_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def fail_engine(self, conn: EngineConnection, reason: str) -> None:
        """The engine is gone: its operations in flight end now with a 503 result."""
        suffix = f"-{conn.index}"
        for op_id in [op for op in self._waiters if op.endswith(suffix)]:
            waiter = self._waiters.pop(op_id)
            if not waiter.done():
                waiter.set_result(_failure(op_id, conn, reason))


def _failure(op_id: str, conn: EngineConnection, reason: str) -> LoraResult:
    logger.warning("adapter operation %s on engine %s failed: %s", op_id, conn.address, reason)
    engine_id = conn.ready.engine_id if conn.ready else conn.address
    error = "An engine of this model did not complete the operation; try again."
    return LoraResult(op_id, engine_id, list(conn.adapters.values()), error=error, error_status=503)
