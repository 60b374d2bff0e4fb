"""Per-choice output processing: engine token deltas -> text deltas with stop strings, logprobs and
finish reasons, the same for streaming and non-streaming responses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from contract.finish_reasons import FINISH_REASON_NAMES
from frontend.sampling_params import SamplingRequest
from frontend.serving.detokenizer import IncrementalDetokenizer, token_bytes, token_text
from frontend.serving.stop_strings import StopStringMatcher
from protocol.messages import FinishReason, RequestDelta, TokenLogprob

# JSON has no -inf; OpenAI-compatible servers send this floor instead (vLLM uses the same).
MIN_LOGPROB = -9999.0


@dataclass
class LogprobEntry:
    token: str
    logprob: float | None  # None only for the first prompt token (nothing predicts it)
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]
    token_id: int = 0
    rank: int | None = None
    top_ids: list[int] = field(default_factory=list)  # ids of `top`, for `return_tokens_as_token_ids`


def logprob_entry(tokenizer: Tokenizer, lp: TokenLogprob) -> LogprobEntry:
    top = [
        (token_text(tokenizer, i), max(v, MIN_LOGPROB), token_bytes(tokenizer, i))
        for i, v in zip(lp.top_ids, lp.top_logprobs, strict=False)
    ]
    return LogprobEntry(
        token_text(tokenizer, lp.token_id),
        max(lp.logprob, MIN_LOGPROB),
        token_bytes(tokenizer, lp.token_id),
        top,
        lp.token_id,
        lp.rank,
        list(lp.top_ids[: len(top)]),
    )


@dataclass
class ChoiceDelta:
    text: str
    token_ids: list[int]
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    error_status: int | None = None


class ChoiceOutput:
    """State of one choice (one engine request) while its tokens arrive."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        *,
        stop: list[str],
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=skip_special_tokens
        )
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_matcher = (
            StopStringMatcher(stop, include_stop_str_in_output=include_stop_str_in_output) if stop else None
        )
        self.token_ids: list[int] = []
        self.text_parts: list[str] = []
        self.logprobs: list[LogprobEntry] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.num_cached_tokens = 0
        self.num_prompt_tokens = len(prompt_token_ids)
        self.error: str | None = None
        self.error_status: int | None = None
        # Engine prompt logprobs (first delta only): position 0 is None, as nothing predicts it.
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.prompt_token_ids = prompt_token_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def stopped_by_string(self) -> bool:
        return isinstance(self.stop_reason, str)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def prompt_entries(self) -> list[LogprobEntry]:
        """The prompt tokens as logprob entries (for echo), the first with logprob None."""
        tok = self.tokenizer
        rows = self.prompt_logprobs or []
        entries = []
        for pos, token_id in enumerate(self.prompt_token_ids):
            lp = rows[pos] if pos < len(rows) else None
            if lp is None:
                entries.append(
                    LogprobEntry(token_text(tok, token_id), None, token_bytes(tok, token_id), [], token_id)
                )
            else:
                entries.append(logprob_entry(tok, lp))
        return entries

    def process(self, delta: RequestDelta) -> ChoiceDelta:
        """Text and tokens this delta adds; once a stop string matches, later deltas add nothing."""
        if self.finished:
            return ChoiceDelta("", [])
        self.num_cached_tokens = delta.num_cached_tokens or self.num_cached_tokens
        if delta.num_prompt_tokens:
            self.num_prompt_tokens = delta.num_prompt_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        text_ids = delta.new_token_ids
        if delta.finish_reason is FinishReason.STOP and text_ids and not self.include_stop_str_in_output:
            # The engine stopped on EOS or a stop token id: like vLLM, its text is not output.
            text_ids = text_ids[:-1]
        new_text = self.detokenizer.push(text_ids) if text_ids else ""
        if delta.finish_reason is not None and delta.finish_reason is not FinishReason.ERROR:
            new_text += self.detokenizer.finish()  # bytes of an incomplete character held back so far
        out = ChoiceDelta("", list(delta.new_token_ids))
        self.token_ids.extend(delta.new_token_ids)
        if delta.logprobs:
            out.logprobs = [logprob_entry(self.tokenizer, lp) for lp in delta.logprobs]
            self.logprobs.extend(out.logprobs)
        if self.stop_matcher is not None:
            emit, matched = self.stop_matcher.feed(new_text)
            if matched is not None:
                self.finish_reason, self.stop_reason = "stop", matched
            elif delta.finish_reason is not None:
                emit += self.stop_matcher.flush()
            new_text = emit
        out.text = new_text
        self.text_parts.append(new_text)
        if self.finish_reason is None and delta.finish_reason is not None:
            if delta.finish_reason is FinishReason.ERROR:
                self.error = delta.error or "the engine failed this request"
                self.error_status = delta.error_status or 500
                out.error, out.error_status = self.error, self.error_status
            else:
                self.finish_reason = FINISH_REASON_NAMES[delta.finish_reason]
                self.stop_reason = delta.stop_reason
        out.finish_reason, out.stop_reason = self.finish_reason, self.stop_reason
        return out


def output_factory(tokenizer: Tokenizer, settings: SamplingRequest) -> Callable[[list[int]], ChoiceOutput]:
    """Builds each choice's output processor (given its prompt's ids) from the request's stop and
    detokenization settings."""

    def make(prompt_token_ids: list[int]) -> ChoiceOutput:
        return ChoiceOutput(
            tokenizer,
            prompt_token_ids,
            stop=settings.stop,
            include_stop_str_in_output=settings.include_stop_str_in_output,
            skip_special_tokens=settings.skip_special_tokens,
        )

    return make
