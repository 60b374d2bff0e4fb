"""What the metrics learn about one finished engine request, and the sink that records it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from protocol.messages import RequestDelta


@dataclass
class RequestTiming:
    """What the metrics need to know about one finished engine request."""

    arrival_time: float  # wall clock (time.time()), as sent in AddRequest
    engine: str = ""
    model_name: str = ""  # the served model's name, for the metrics' model_name label
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    finish_reason: str = "abort"
    queue_time_s: float | None = None  # measured by the engine
    max_tokens: int = 0  # the request's parameters, for vllm:request_params_*
    n: int = 1
    num_preemptions: int = 0  # reported by the engine with the last token

    def observe(self, delta: RequestDelta, now: float) -> None:
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_preemptions = max(self.num_preemptions, delta.num_preemptions)
        if delta.queue_time_s is not None:
            self.queue_time_s = delta.queue_time_s
        if not delta.new_token_ids:
            return
        if self.last_token_at is None:
            self.first_token_at = now
        else:
            self.inter_token_s.append(now - self.last_token_at)
        self.last_token_at = now
        self.num_generation_tokens += len(delta.new_token_ids)


class RequestMetricsSink(Protocol):
    def record_request(self, timing: RequestTiming, finished_at: float) -> None: ...
