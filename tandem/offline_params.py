"""The offline API's public types: the user-facing `SamplingParams` and the output records `LLM` returns.

`SamplingParams` is a plain dataclass with vLLM-like defaults. It becomes the transport-neutral
`SamplingRequest` (checked as the server checks its fields), which the input processor the HTTP server
uses turns into the engine's wire struct, so a setting means exactly the same offline and over HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from frontend.errors import APIError
from frontend.sampling_params import SamplingRequest, check_sampling_request
from frontend.schemas import StructuredOutputs
from frontend.schemas.checks import check_structured_outputs
from frontend.schemas.to_sampling import from_structured_outputs
from frontend.serving.tool_parsers import ToolCall as ToolCall  # re-exported: the outputs' tool calls
from protocol.messages import StructuredSpec


@dataclass
class StructuredOutputsParams:
    """One output constraint; set exactly one field (as the server's `structured_outputs` object)."""

    json: str | dict[str, Any] | None = None  # a JSON schema, as a dict or as JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


@dataclass
class SamplingParams:
    """How to sample one request. Defaults follow vLLM: 16 new tokens, temperature 1."""

    n: int = 1
    max_tokens: int | None = 16  # None: all the room left in the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None, 0 or -1: no top-k cut
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def _structured(self) -> StructuredSpec | None:
        shortcuts = {"json_schema": self.json_schema, "regex": self.regex, "choice": self.choice}
        shortcuts["grammar"] = self.grammar
        given = [name for name, value in shortcuts.items() if value is not None]
        if self.structured_outputs is not None:
            given.append("structured_outputs")
        if len(given) > 1:
            raise ValueError(f"set at most one output constraint; got {', '.join(given)}")
        so = self.structured_outputs
        if so is not None:
            body = StructuredOutputs(so.json, so.regex, so.choice, so.grammar, so.json_object)
        elif given:
            body = StructuredOutputs(
                json=self.json_schema, regex=self.regex, choice=self.choice, grammar=self.grammar
            )
        else:
            return None
        check_structured_outputs(body)  # the server's check of its `structured_outputs` object
        return from_structured_outputs(body)

    def to_request(self) -> SamplingRequest:
        """These settings as the input processor takes them, checked as the server checks its fields;
        raises ValueError naming the bad setting."""
        try:
            settings = SamplingRequest(
                n=self.n,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                seed=self.seed,
                min_tokens=self.min_tokens,
                stop=self.stop_strings,
                stop_token_ids=self.stop_token_ids,
                include_stop_str_in_output=self.include_stop_str_in_output,
                ignore_eos=self.ignore_eos,
                skip_special_tokens=self.skip_special_tokens,
                logprobs=self.logprobs,
                prompt_logprobs=self.prompt_logprobs,
                logit_bias=dict(self.logit_bias) if self.logit_bias else None,
                allowed_token_ids=self.allowed_token_ids,
                structured=self._structured(),
            )
            check_sampling_request(settings)
        except APIError as exc:
            raise ValueError(exc.message) from None
        return settings


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


# Per position: the sampled (or prompt) token and the top alternatives, keyed by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "tool_calls", "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    # What the server's chat answer carries in `message`: `text` less any parsed tool calls (None when
    # nothing is left), and the calls. Without tool calling, `content` is `text` and `tool_calls` empty.
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def cumulative_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return sum(pos[tid].logprob for pos, tid in zip(self.logprobs, self.token_ids, strict=False))


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    finished: bool = True


@dataclass
class EmbeddingOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    embedding: list[float] = field(default_factory=list)
