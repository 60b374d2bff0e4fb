"""The transport-free heart of an engine: admit requests, run one step at a time, report deltas.

EngineCore drives it over ZeroMQ; the offline `LLM` API drives it in-process. Both therefore share
one implementation of admission, scheduling, sampling and stop handling.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable

from engine.engine_setup import EngineParts
from engine.request import Request, RequestStatus
from engine.request_intake import RequestRejected, make_request
from engine.scheduler import SchedulerOutput, step_failed_message
from engine.step_output import LogprobRow, ModelRunnerOutput, RequestUpdate
from engine.step_protocol import Stepper, error_delta
from engine.structured import StructuredOutputs
from protocol.messages import (
    ITERATION_TOKENS_BUCKETS,
    AddRequest,
    RequestDelta,
    SchedulerStats,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

__all__ = ["EngineStepper", "error_delta"]


def _prompt_logprobs(
    request: Request, rows: list[LogprobRow | None] | None
) -> list[TokenLogprob | None] | None:
    if rows is None:
        return None
    return [
        None if row is None else TokenLogprob(request.prompt_token_ids[pos], row[0], row[1], row[2], row[3])
        for pos, row in enumerate(rows)
    ]


def _delta(update: RequestUpdate) -> RequestDelta:
    request = update.request
    token_ids = update.token_ids
    if update.error is not None or not token_ids:
        return error_delta(request.request_id, update.error or "", update.error_status)
    lp = update.logprobs
    token_id = token_ids[0]  # logprobs are asked for by requests that never speculate: one token
    return RequestDelta(
        request.request_id,
        token_ids,
        finish_reason=request.finish_reason,
        stop_reason=request.stop_reason,
        num_cached_tokens=request.num_cached_tokens or 0,
        logprobs=[TokenLogprob(token_id, lp[0], lp[1], lp[2], lp[3])] if lp else None,
        prompt_logprobs=_prompt_logprobs(request, update.prompt_logprobs),
        num_prompt_tokens=request.num_prompt_tokens,
        queue_time_s=request.queue_time_s if request.num_output_tokens == len(token_ids) else None,
        num_preemptions=request.num_preemptions if request.finish_reason is not None else 0,
    )


class EngineStepper(Stepper):
    def __init__(self, parts: EngineParts, *, max_waiting_requests: int | None = None) -> None:
        self.parts = parts
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.max_waiting_requests = max_waiting_requests
        self.owner: dict[str, bytes] = {}  # request_id -> client that sent it
        self.step_count = 0
        self.max_step_num_seqs = 0
        self.last_step_num_seqs = 0
        self.last_step_num_tokens = 0
        # vllm:iteration_tokens_total: steps per ITERATION_TOKENS_BUCKETS bound (+1 overflow), token sum
        self.iteration_tokens_counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        self.iteration_tokens_sum = 0
        self.last_step_had_work = False
        self._structured: StructuredOutputs | None = None

    @property
    def structured(self) -> StructuredOutputs:
        # Built on the first constrained request: engines that never see one start no grammar threads.
        if self._structured is None:
            ready = self.parts.ready
            self._structured = StructuredOutputs.create(
                ready.tokenizer_json, self.parts.vocab_size, self.parts.eos_token_ids
            )
            self.scheduler.grammars = self._structured  # update_from_output advances the matchers
        return self._structured

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, message: AddRequest, client_id: bytes, frames: list[bytes]) -> RequestDelta | None:
        """Queues the request; returns an error delta instead when it cannot be accepted."""
        limit = self.max_waiting_requests
        if limit is not None and self.scheduler.num_waiting >= limit:
            return error_delta(message.request_id, "the engine's waiting queue is full", 503)
        if message.request_id in self.owner:
            return error_delta(
                message.request_id, f"request id {message.request_id!r} is already running", 400
            )
        try:
            request = make_request(message, client_id, frames, self.parts)
        except RequestRejected as exc:
            return error_delta(message.request_id, str(exc), exc.status)
        except Exception:  # a message no check foresaw: it fails alone, the engine carries on
            logger.exception("could not accept request %r", message.request_id)
            return error_delta(message.request_id, "The engine could not read this request.", 400)
        self.owner[request.request_id] = client_id
        if request.sampling.structured is not None:
            self.structured.attach(request)  # compiles off this thread; the scheduler waits for it
        self.scheduler.add_request(request)
        return None

    def abort(self, request_ids: Iterable[str]) -> None:
        for request in self.scheduler.abort_requests(request_ids):
            self._forget(request)

    def abort_client(self, client_id: bytes) -> int:
        orphans = [rid for rid, owner in self.owner.items() if owner == client_id]
        self.abort(orphans)
        return len(orphans)

    def step(self) -> list[tuple[bytes, RequestDelta]]:
        """Runs one engine step; returns (client, delta) for every request that produced output."""
        grammar_failures = self._poll_grammars()
        out = self.scheduler.schedule()
        self.last_step_had_work = not out.is_empty or bool(grammar_failures)
        if out.is_empty:
            return grammar_failures
        self.step_count += 1
        self.last_step_num_seqs = len(out.scheduled)
        self.last_step_num_tokens = out.num_tokens
        self.max_step_num_seqs = max(self.max_step_num_seqs, self.last_step_num_seqs)
        self.iteration_tokens_counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, out.num_tokens)] += 1
        self.iteration_tokens_sum += out.num_tokens
        output = self._execute_isolating(out)
        updates = self.scheduler.update_from_output(out, output)
        deltas = grammar_failures
        for update in updates:
            request = update.request
            deltas.append((request.client_id, _delta(update)))
            if request.status is RequestStatus.FINISHED:
                self._forget(request)
        return deltas

    def _poll_grammars(self) -> list[tuple[bytes, RequestDelta]]:
        """Error deltas (400) for requests whose grammar failed to compile; they never ran."""
        if self._structured is None or not self._structured.compiling:
            return []
        deltas = []
        for request, error in self._structured.poll():
            self.scheduler.finish_with_error(request)
            deltas.append((request.client_id, error_delta(request.request_id, error, 400)))
            self._forget(request)
        return deltas

    def _execute_isolating(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """The step's output; requests whose step failed are listed in its `failed`. When the batch fails,
        each request runs again alone, so one request's bad input or an engine bug it triggers costs that
        request only: the others get their token from the retry. Rerunning a row is safe: the runner
        changes no request, and the KV-cache writes of the failed attempt are rewritten with the same
        values."""
        bitmask = self._structured.bitmask if self._structured else None
        try:
            return self.runner.execute(out, bitmask)
        except Exception:
            logger.exception(
                "model step over %d requests failed (%s)",
                len(out.rows),
                ", ".join(row.request.request_id for row in out.rows[:8]),
            )
        if len(out.rows) == 1:
            return ModelRunnerOutput(failed=[out.rows[0].request.request_id])
        merged = ModelRunnerOutput()
        for row in out.rows:
            try:
                # The row's own block copies again (copying twice writes the same values).
                copies = [c for c in out.block_copies if c.dst in row.request.block_ids]
                merged.merge(self.runner.execute(SchedulerOutput([row], block_copies=copies), bitmask))
            except Exception:
                logger.exception("request %s fails the model step on its own", row.request.request_id)
                merged.failed.append(row.request.request_id)
        return merged

    def _fail(self, requests: Iterable[Request]) -> list[tuple[bytes, RequestDelta]]:
        deltas = []
        for request in requests:
            self.scheduler.finish_with_error(request)
            message = step_failed_message(request.request_id)
            deltas.append((request.client_id, error_delta(request.request_id, message, 500)))
            self._forget(request)
        return deltas

    def fail_all(self) -> list[tuple[bytes, RequestDelta]]:
        """Last resort after an engine bug outside the model step (the scheduler, say): every request
        ends with an error and frees its blocks, and the engine keeps serving new ones."""
        return self._fail(list(self.scheduler.requests.values()))

    def _forget(self, request: Request) -> None:
        self.owner.pop(request.request_id, None)
        if self._structured is not None:
            self._structured.forget(request.request_id)

    def stats(self) -> SchedulerStats:
        kv = self.scheduler.kv_cache
        return SchedulerStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=kv.usage,
            step=self.step_count,
            num_scheduled_seqs=self.last_step_num_seqs,
            num_scheduled_tokens=self.last_step_num_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.num_queried_tokens,
            prefix_cache_hits=kv.num_hit_tokens,
            max_step_num_seqs=self.max_step_num_seqs,
            num_free_blocks=kv.num_free_blocks,
            num_waiting_deferred=sum(1 for r in self.scheduler.waiting if r.is_waiting_for_grammar),
            iteration_tokens_counts=list(self.iteration_tokens_counts),
            iteration_tokens_sum=self.iteration_tokens_sum,
            spec_decode_num_draft_tokens=self.scheduler.num_draft_tokens,
            spec_decode_num_accepted_tokens=self.scheduler.num_accepted_tokens,
        )
