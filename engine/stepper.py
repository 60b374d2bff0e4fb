"""The transport-free heart of an engine: admit requests, run one step at a time, report deltas.

EngineCore drives it over ZeroMQ; the offline `LLM` API drives it in-process. Both therefore share
one implementation of admission, scheduling, sampling and stop handling.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable

from engine.engine_setup import EngineParts
from engine.model_runner import StepResult
from engine.request import Request
from engine.request_intake import RequestRejected, make_request
from engine.scheduler import SchedulerOutput
from engine.structured import StructuredOutputs
from protocol.messages import (
    ITERATION_TOKENS_BUCKETS,
    AddRequest,
    FinishReason,
    RequestDelta,
    SchedulerStats,
    TokenLogprob,
)

logger = logging.getLogger(__name__)


def error_delta(request_id: str, error: str, status: int) -> RequestDelta:
    return RequestDelta(request_id, [], finish_reason=FinishReason.ERROR, error=error, error_status=status)


def step_failed_message(request_id: str) -> str:
    # A public sentence: the exception and its traceback go to the engine log, keyed by the request id.
    return f"The engine failed while running request {request_id}; the details are in the engine log."


def _prompt_logprobs(
    request: Request, rows: list[tuple[float, int, list[int], list[float]] | None] | None
) -> list[TokenLogprob | None] | None:
    if rows is None:
        return None
    return [
        None if row is None else TokenLogprob(request.prompt_token_ids[pos], row[0], row[1], row[2], row[3])
        for pos, row in enumerate(rows)
    ]


class EngineStepper:
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
        self.num_bad_messages = 0  # set by the transport
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
        result, failed = self._execute_isolating(out)
        if failed:
            grammar_failures += self._fail(failed)
            out = SchedulerOutput([(r, n) for r, n in out.scheduled if not r.is_finished], out.num_preempted)
        grammar_errors = {}
        if self._structured is not None:
            # The runner decided which rows sample; advance feeds only the requests in result.sampled.
            grammar_errors = self._structured.advance([r for r, _ in out.scheduled], result.sampled)
        finished = self.scheduler.update_after_step(out, result.sampled)
        deltas = grammar_failures + self._fail_grammars(out, grammar_errors, finished)
        finished_ids = {r.request_id for r in finished}
        for request, _ in out.scheduled:
            token_id = result.sampled.get(request.request_id)
            if token_id is None or (request.is_finished and request.request_id not in finished_ids):
                continue
            lp = result.logprobs.get(request.request_id)
            delta = RequestDelta(
                request.request_id,
                [token_id],
                finish_reason=request.finish_reason,
                stop_reason=request.stop_reason,
                num_cached_tokens=request.num_cached_tokens or 0,
                logprobs=[TokenLogprob(token_id, lp[0], lp[1], lp[2], lp[3])] if lp else None,
                prompt_logprobs=_prompt_logprobs(request, result.prompt_logprobs.get(request.request_id)),
                num_prompt_tokens=request.num_prompt_tokens,
                queue_time_s=request.queue_time_s if request.num_output_tokens == 1 else None,
                num_preemptions=request.num_preemptions if request.finish_reason is not None else 0,
            )
            deltas.append((request.client_id, delta))
        for request in finished:
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

    def _fail_grammars(
        self, out: SchedulerOutput, errors: dict[str, str], finished: list[Request]
    ) -> list[tuple[bytes, RequestDelta]]:
        """A token its grammar rejected ends the request with an error. The mask forbids such tokens, so
        this happens when the request's other settings (allowed_token_ids, logit_bias, ...) forbid every
        token the grammar allows: a contradiction in the request itself, hence 400. A complete grammar
        needs nothing here: its mask then allows only EOS, which stops the request."""
        deltas = []
        for request, _ in out.scheduled:
            error = errors.get(request.request_id)
            if error is None:
                continue
            logger.warning("request %s: %s", request.request_id, error[:2000])
            if request in finished:
                finished.remove(request)
            self.scheduler.finish_with_error(request)
            message = (
                "No token satisfies both the structured-output constraint and the request's other "
                "sampling settings (allowed_token_ids, logit_bias, bad words, min_tokens)."
            )
            deltas.append((request.client_id, error_delta(request.request_id, message, 400)))
            self._forget(request)
        return deltas

    def _execute_isolating(self, out: SchedulerOutput) -> tuple[StepResult, list[Request]]:
        """(result, requests whose step failed). When the batch fails, each request runs again alone, so
        one request's bad input or an engine bug it triggers costs that request only: the others get their
        token from the retry. Rerunning a row is safe: nothing is committed before update_after_step, and
        the KV-cache writes of the failed attempt are rewritten with the same values."""
        bitmask = self._structured.bitmask if self._structured else None
        try:
            return self.runner.execute(out, bitmask), []
        except Exception:
            logger.exception(
                "model step over %d requests failed (%s)",
                len(out.scheduled),
                ", ".join(r.request_id for r, _ in out.scheduled[:8]),
            )
        if len(out.scheduled) == 1:
            return StepResult({}, {}, {}), [out.scheduled[0][0]]
        merged = StepResult({}, {}, {})
        failed = []
        for entry in out.scheduled:
            try:
                alone = self.runner.execute(SchedulerOutput([entry]), bitmask)
            except Exception:
                logger.exception("request %s fails the model step on its own", entry[0].request_id)
                failed.append(entry[0])
                continue
            merged.sampled.update(alone.sampled)
            merged.logprobs.update(alone.logprobs)
            merged.prompt_logprobs.update(alone.prompt_logprobs)
        return merged, failed

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
        self.runner.sampler.forget(request.request_id)

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
            num_bad_messages=self.num_bad_messages,
            num_waiting_deferred=sum(1 for r in self.scheduler.waiting if r.is_waiting_for_grammar),
            iteration_tokens_counts=list(self.iteration_tokens_counts),
            iteration_tokens_sum=self.iteration_tokens_sum,
        )
