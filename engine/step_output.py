"""What one model step returns to the scheduler, and what the scheduler hands the stepper: plain data.

No torch here: the scheduler imports it. The runner builds a `ModelRunnerOutput` and writes no request
state; `Scheduler.update_from_output` alone applies it and returns one `RequestUpdate` per request that
has news; the stepper turns those into wire deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.request import Request

# (logprob of the token, its rank in the distribution (1 = most likely), top ids, top logprobs)
LogprobRow = tuple[float, int, list[int], list[float]]


@dataclass
class PromptLogprobChunk:
    """Logprobs of prompt tokens start + 1 .. start + len(rows), computed in one step."""

    start: int
    rows: list[LogprobRow]


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request_id -> new token, rows that sampled
    logprobs: dict[str, LogprobRow] = field(default_factory=dict)
    prompt_logprobs: dict[str, PromptLogprobChunk] = field(default_factory=dict)  # this step's chunk
    # Rows with drafts: the argmax token after each of the row's 1 + len(drafts) positions.
    draft_targets: dict[str, list[int]] = field(default_factory=dict)
    # Requests whose step failed even when run alone (set by the stepper's isolation, never the runner).
    failed: list[str] = field(default_factory=list)

    def merge(self, other: ModelRunnerOutput) -> None:
        self.sampled.update(other.sampled)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)
        self.draft_targets.update(other.draft_targets)
        self.failed += other.failed


@dataclass(slots=True)
class RequestUpdate:
    """One request's news from a step: its new tokens (one, with its logprobs if asked for; several when
    drafts were accepted), or an error that ended it."""

    request: Request
    token_ids: list[int] = field(default_factory=list)
    logprobs: LogprobRow | None = None
    prompt_logprobs: list[LogprobRow | None] | None = None  # the whole prompt's, with the first token
    error: str | None = None
    error_status: int = 0
