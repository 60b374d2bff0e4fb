"""Engine-side state of one request: its tokens, progress, KV blocks and sampling settings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.step_output import LogprobRow
from protocol.messages import FinishReason, SamplingParams

if TYPE_CHECKING:  # annotations only: the scheduler side never imports torch or llguidance
    import torch

    from engine.lora.adapter import LoraWeights
    from engine.structured import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class PromptEmbeds:
    """Rows that replace token embeddings at prompt positions start : start + len(rows)."""

    start: int
    rows: torch.Tensor  # [num_tokens, hidden]
    digest: str

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def num_tokens(self) -> int:
        return int(self.rows.shape[0])


@dataclass(eq=False)
class Request:
    request_id: str
    client_id: bytes  # ZeroMQ identity of the API process that owns this request
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    priority: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    prompt_embeds: list[PromptEmbeds] = field(default_factory=list)
    cache_salt: str | None = None
    embed_task: bool = False

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None  # prefix-cache hit at first scheduling; None until then
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of this request's full blocks
    num_registered_blocks: int = 0  # leading blocks already published to the prefix cache
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None
    num_preemptions: int = 0
    sent_prompt_logprobs: bool = False
    # Prompt logprobs gathered so far (index = prompt position; position 0 is None), until they are sent.
    prompt_logprob_rows: list[LogprobRow | None] | None = None
    received_at: float = field(default_factory=time.monotonic)  # when this engine got the request
    queue_time_s: float | None = None  # received -> first scheduled; kept through preemptions
    grammar: RequestGrammar | None = None  # constrained requests only
    # The adapter's weights this request runs under (None: the base model), held here so an unload
    # lets the request finish with the weights it started with.
    lora: LoraWeights | None = None

    @property
    def lora_key(self) -> str | None:
        """Identifies the adapter's weights: the scheduler counts distinct ones, prefix caching keys by it."""
        return None if self.lora is None else str(self.lora.cache_key)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_waiting_for_grammar(self) -> bool:
        return self.grammar is not None and not self.grammar.is_ready

    def token_id_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def embed_key_for(self, start: int, end: int) -> tuple[str, ...]:
        """Digests of the prompt embeddings overlapping positions [start, end): extra keys for block hashes."""
        return tuple(e.digest for e in self.prompt_embeds if e.start < end and e.end > start)
