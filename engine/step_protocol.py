"""What an engine process (EngineCore) and the offline LLM need from the thing that runs steps.

EngineStepper (text generation) and EmbeddingStepper (--task embed) both implement `Stepper`; they
derive from it, so mypy checks each against it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from protocol.messages import AddRequest, FinishReason, RequestDelta, SchedulerStats


def error_delta(request_id: str, error: str, status: int) -> RequestDelta:
    return RequestDelta(request_id, [], finish_reason=FinishReason.ERROR, error=error, error_status=status)


class Stepper(Protocol):
    last_step_had_work: bool  # the last step() scheduled something (else the loop may nap)

    @property
    def has_work(self) -> bool: ...

    def add(self, message: AddRequest, client_id: bytes, frames: list[bytes]) -> RequestDelta | None:
        """Queues the request; returns an error delta instead when it cannot be accepted."""
        ...

    def abort(self, request_ids: Iterable[str]) -> None: ...

    def abort_client(self, client_id: bytes) -> int:
        """Aborts every request of one client; returns how many there were."""
        ...

    def step(self) -> list[tuple[bytes, RequestDelta]]:
        """Runs one step; returns (client, delta) for every request that has news."""
        ...

    def fail_all(self) -> list[tuple[bytes, RequestDelta]]:
        """Last resort after an engine bug outside the model call: every request ends with an error."""
        ...

    def stats(self) -> SchedulerStats: ...
