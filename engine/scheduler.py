"""Continuous-batching scheduler: one token budget per step, running requests first, then waiting ones.

No prefill/decode phases: each step maps request -> number of tokens to compute. A long prompt is
chunked across steps; when KV blocks run out the newest (or lowest-priority) running request is
preempted and recomputed later. No torch here.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from engine.kv_cache import BlockCopy, KVCacheManager
from engine.request import Request, RequestStatus
from engine.spec.config import SpeculativeConfig
from engine.spec.eligibility import can_speculate
from engine.spec.ngram import propose_ngram
from engine.step_output import ModelRunnerOutput, PromptLogprobChunk, RequestUpdate
from protocol.messages import FinishReason

logger = logging.getLogger(__name__)

# A token its grammar rejected: the mask forbids such tokens, so this happens when the request's other
# settings forbid every token the grammar allows, a contradiction in the request itself (hence 400).
GRAMMAR_CONTRADICTION = (
    "No token satisfies both the structured-output constraint and the request's other "
    "sampling settings (allowed_token_ids, logit_bias, bad words, min_tokens)."
)


def step_failed_message(request_id: str) -> str:
    # A public sentence: the exception and its traceback go to the engine log, keyed by the request id.
    return f"The engine failed while running request {request_id}; the details are in the engine log."


class ScheduledRequest(NamedTuple):
    """One row of a step's plan, fixed when it is scheduled: the runner reads this, never the request's
    progress (which only update_from_output moves). A NamedTuple: built for every row of every step,
    and a frozen dataclass costs several times more to build."""

    request: Request
    num_new: int  # tokens computed this step
    start: int  # position of the first of them (the request's computed tokens when scheduled)
    samples: bool  # the chunk reaches the end of the known tokens: the row samples a new one
    prompt_logprobs: bool  # the chunk's prompt positions need logprobs (asked for, not yet sent)
    # Speculative decoding: draft tokens computed after the row's last known token (num_new = 1 + len);
    # the runner returns the argmax at each of those 1 + len positions instead of sampling.
    drafts: tuple[int, ...] = ()


@dataclass
class SchedulerOutput:
    """A step's self-contained plan, already corrected for the preemptions made while building it."""

    rows: list[ScheduledRequest] = field(default_factory=list)  # batch order
    num_preempted: int = 0
    # Requests that ended since the last plan: the runner drops what it keeps for them (seeded generators).
    finished_request_ids: set[str] = field(default_factory=set)
    # KV slots the runner copies before the step: admitted prompts reusing part of a cached block.
    block_copies: list[BlockCopy] = field(default_factory=list)

    @property
    def scheduled(self) -> list[tuple[Request, int]]:
        """(request, tokens this step) in batch order, for readers that need no more (LoRA slot mapping)."""
        return [(row.request, row.num_new) for row in self.rows]

    @property
    def num_tokens(self) -> int:
        return sum(row.num_new for row in self.rows)

    @property
    def is_empty(self) -> bool:
        return not self.rows


def _plan_row(request: Request, num_new: int) -> ScheduledRequest:
    start = request.num_computed_tokens
    return ScheduledRequest(
        request,
        num_new,
        start,
        start + num_new == len(request.prompt_token_ids) + len(request.output_token_ids),
        request.sampling.prompt_logprobs is not None and not request.sent_prompt_logprobs,
    )


class GrammarAdvancer(Protocol):
    """engine.structured.StructuredOutputs, seen from here (it needs llguidance; the scheduler does not)."""

    def advance(self, rows: list[Request], sampled: dict[str, int]) -> dict[str, str]: ...


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    long_prefill_token_threshold: int | None = None
    priority_policy: bool = False
    max_loras: int | None = None  # --max-loras with LoRA on: distinct adapters running at once


class Scheduler:
    def __init__(
        self, limits: SchedulerLimits, kv_cache: KVCacheManager, speculative: SpeculativeConfig | None = None
    ) -> None:
        self.limits = limits
        self.kv_cache = kv_cache
        self.speculative = speculative
        self.num_draft_tokens = 0  # cumulative: drafts verified, and those the model agreed with
        self.num_accepted_tokens = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.grammars: GrammarAdvancer | None = None  # set by the stepper with its first constrained request
        self._finished_ids: set[str] = set()  # ended since the last plan (see SchedulerOutput)

    # -- intake ---------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            self._finish(request, FinishReason.ABORT)
            aborted.append(request)
        return aborted

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one step -------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.limits.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if out.num_preempted == 0:
            self._schedule_waiting(out, budget)
        if out.rows:  # an empty plan never reaches the runner: keep the ids for the next one
            out.finished_request_ids, self._finished_ids = self._finished_ids, set()
        return out

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        num_new = request.num_tokens - num_computed
        if self.limits.long_prefill_token_threshold is not None:
            num_new = min(num_new, self.limits.long_prefill_token_threshold)
        return min(num_new, budget)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0  # running[:index] were looked at this step (scheduled, or nothing left to compute)
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
            if num_new <= 0:
                index += 1
                continue
            if self.speculative is not None and num_new == 1:
                row = self._speculative_row(request, budget, len(self.running) - index - 1)
                if row is not None:
                    out.rows.append(row)
                    budget -= row.num_new
                    index += 1
                    continue
            while not self.kv_cache.allocate_slots(request, num_new):
                victim_index = self._pick_victim()
                victim = self.running.pop(victim_index)
                if victim_index < index:
                    # The priority policy can evict a request looked at earlier in this step: keep the loop
                    # index on the same request, and take the victim back out of the batch with its tokens.
                    index -= 1
                    budget += self._unschedule(out, victim)
                self._preempt(victim)
                out.num_preempted += 1
                if victim is request:
                    break
            else:
                out.rows.append(_plan_row(request, num_new))
                budget -= num_new
                index += 1
        return budget

    def _speculative_row(self, request: Request, budget: int, num_behind: int) -> ScheduledRequest | None:
        """A decode row with drafts, or None: no drafts, or no room for them, and the row decodes one token
        as usual. Drafts never cost another request its step: one token of the budget and one free block
        stay for each of the num_behind running requests after this one, so guesses never cause a
        preemption."""
        spec = self.speculative
        assert spec is not None
        num_tokens = request.num_tokens
        if request.num_computed_tokens != num_tokens - 1 or not can_speculate(request):
            return None
        room = min(
            spec.num_speculative_tokens,
            budget - 1 - num_behind,
            self.limits.max_model_len - num_tokens,  # the drafts' positions stay inside the context
            request.sampling.max_tokens - request.num_output_tokens - 1,  # the bonus token is one more
        )
        if room <= 0:
            return None
        drafts = propose_ngram(
            request.prompt_token_ids,
            request.output_token_ids,
            room,
            spec.prompt_lookup_min,
            spec.prompt_lookup_max,
        )
        if not drafts:
            return None
        start = request.num_computed_tokens
        kv = self.kv_cache
        new_blocks = kv.blocks_needed(start + 1 + len(drafts)) - len(request.block_ids)
        if kv.num_free_blocks - new_blocks < num_behind or not kv.allocate_slots(request, 1 + len(drafts)):
            return None
        return ScheduledRequest(request, 1 + len(drafts), start, False, False, tuple(drafts))

    @staticmethod
    def _unschedule(out: SchedulerOutput, request: Request) -> int:
        """Remove request from this step's batch (if there); returns the tokens it had been given."""
        for position, row in enumerate(out.rows):
            if row.request is request:
                del out.rows[position]
                return row.num_new
        return 0

    def _pick_victim(self) -> int:
        """Index in self.running of the request to preempt: the lowest priority (then newest), or the newest."""
        if self.limits.priority_policy:
            running = self.running
            return max(range(len(running)), key=lambda i: (running[i].priority, running[i].arrival_time))
        return len(self.running) - 1

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _next_waiting(self) -> Request | None:
        # A request whose grammar is still compiling is skipped; the ones behind it may run. So is one
        # whose adapter would be one more than --max-loras running at once (it waits for a slot).
        lora_keys = self._running_lora_keys()
        ready = (r for r in self.waiting if not r.is_waiting_for_grammar and self._lora_fits(r, lora_keys))
        if self.limits.priority_policy:
            return min(ready, key=lambda r: (r.priority, r.arrival_time), default=None)
        return next(ready, None)

    def _running_lora_keys(self) -> set[str | None] | None:
        if self.limits.max_loras is None:
            return None
        return {r.lora_key for r in self.running if r.lora is not None}

    def _lora_fits(self, request: Request, running_keys: set[str | None] | None) -> bool:
        if running_keys is None or request.lora is None or request.lora_key in running_keys:
            return True
        return len(running_keys) < (self.limits.max_loras or 0)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            request = self._next_waiting()
            if request is None:
                break
            admitted = self._allocate_admission(request, budget)
            if admitted is None:
                break  # wait for blocks to free up; keep FCFS order
            num_cached, num_new, copy = admitted
            if copy is not None:
                out.block_copies.append(copy)
            self.waiting.remove(request)
            self.kv_cache.record_prefix_lookup(request, num_cached)
            if request.queue_time_s is None:
                request.queue_time_s = time.monotonic() - request.received_at
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_cached
            self.running.append(request)
            out.rows.append(_plan_row(request, num_new))
            budget -= num_new

    def _allocate_admission(self, request: Request, budget: int) -> tuple[int, int, BlockCopy | None] | None:
        """Blocks for a waiting request: its cached whole blocks, then a cached partial block to copy from
        if one continues them (its pin needs one more free block: without room for it, the request is
        admitted without it). (cached tokens, new tokens, the copy), or None when the blocks do not fit."""
        cached = self.kv_cache.find_cached_prefix(request)
        tail = self.kv_cache.find_cached_tail(request, len(cached))
        for candidate in (tail, None) if tail is not None else (None,):
            num_cached = len(cached) * self.kv_cache.block_size + (candidate.num_tokens if candidate else 0)
            num_new = self._num_new_tokens(request, num_cached, budget)
            if self.kv_cache.allocate_slots(request, num_new, cached, candidate):
                if candidate is None:
                    return num_cached, num_new, None
                dst = request.block_ids[len(cached)]  # the request's own block after the shared ones
                return num_cached, num_new, BlockCopy(candidate.block_id, dst, candidate.num_tokens)
        return None

    # -- results --------------------------------------------------------------------------------------
    def update_from_output(self, plan: SchedulerOutput, output: ModelRunnerOutput) -> list[RequestUpdate]:
        """The one place a step's results change requests: progress, prompt logprobs, sampled tokens,
        grammar checks, stops and step failures. Returns the news of each request, errors first."""
        for copy in plan.block_copies:  # copied (or the step failed): the sources may be reused now
            self.kv_cache.release_copy_source(copy)
        errors: list[RequestUpdate] = []
        if output.failed:
            failed = set(output.failed)
            for row in plan.rows:
                if row.request.request_id in failed and not row.request.is_finished:
                    self._finish(row.request, FinishReason.ERROR)
                    message = step_failed_message(row.request.request_id)
                    errors.append(RequestUpdate(row.request, error=message, error_status=500))
        rejected: dict[str, str] = {}
        if self.grammars is not None:
            live = [row.request for row in plan.rows if not row.request.is_finished]
            rejected = self.grammars.advance(live, output.sampled)
        sampled, logprobs, prompt_chunks = output.sampled, output.logprobs, output.prompt_logprobs
        updates: list[RequestUpdate] = []
        for request, num_new, start, _, wants_prompt_logprobs, drafts in plan.rows:
            if request.status is RequestStatus.FINISHED:
                continue  # failed above, or aborted while the step ran
            request_id = request.request_id
            if drafts:
                targets = output.draft_targets.get(request_id)
                if targets is not None:
                    updates.append(self._accept_drafts(request, start, drafts, targets))
                continue
            request.num_computed_tokens += num_new
            self.kv_cache.cache_full_blocks(request)
            if prompt_chunks:
                chunk = prompt_chunks.get(request_id)
                if chunk is not None:
                    add_prompt_logprobs(request, chunk)
            token_id = sampled.get(request_id)
            if token_id is None:
                continue  # a prefill chunk that has not reached the end of the prompt yet
            request.output_token_ids.append(token_id)
            if request_id in rejected:
                logger.warning("request %s: %s", request_id, rejected[request_id][:2000])
                self._finish(request, FinishReason.ERROR)
                errors.append(RequestUpdate(request, error=GRAMMAR_CONTRADICTION, error_status=400))
                continue
            update = RequestUpdate(request, [token_id], logprobs.get(request_id))
            if wants_prompt_logprobs:
                # Sent once, with the first token: a recompute after preemption does not redo them.
                update.prompt_logprobs = request.prompt_logprob_rows or [None]
                request.prompt_logprob_rows = None
                request.sent_prompt_logprobs = True
            reason = self._stop_reason(request, token_id)
            if reason is not None:
                self._finish(request, reason)
            updates.append(update)
        return errors + updates

    def _accept_drafts(
        self, request: Request, start: int, drafts: tuple[int, ...], targets: list[int]
    ) -> RequestUpdate:
        """Keeps the drafts the model agrees with, then its own next token: targets[i] is the argmax after
        the row's token i, so draft i + 1 stands when it equals targets[i], and the tokens emitted are
        targets[: accepted + 1]. They are applied one by one with the usual stop checks."""
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
            accepted += 1
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += accepted
        emitted: list[int] = []
        reason = None
        for token_id in targets[: accepted + 1]:
            request.output_token_ids.append(token_id)
            emitted.append(token_id)
            reason = self._stop_reason(request, token_id)
            if reason is not None:
                break
        # KV is valid for the row's first token and the accepted drafts only: the rejected drafts' slots
        # are overwritten by later steps, and prefix-cache hashing (cache_full_blocks) stops here too.
        request.num_computed_tokens = min(start + 1 + accepted, request.num_tokens - 1)
        self.kv_cache.cache_full_blocks(request)
        if reason is not None:
            self._finish(request, reason)
        return RequestUpdate(request, emitted)

    def _stop_reason(self, request: Request, token_id: int) -> FinishReason | None:
        sampling = request.sampling
        if request.num_output_tokens >= sampling.min_tokens:
            if not sampling.ignore_eos and token_id in request.eos_token_ids:
                request.stop_reason = None
                return FinishReason.STOP
            if token_id in sampling.stop_token_ids:
                request.stop_reason = token_id
                return FinishReason.STOP
        if (
            request.num_output_tokens >= sampling.max_tokens
            or request.num_tokens >= self.limits.max_model_len
        ):
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.finish_reason = reason  # before free(): a failed request's blocks are not offered for reuse
        self.kv_cache.free(request)
        request.status = RequestStatus.FINISHED
        del self.requests[request.request_id]
        self._finished_ids.add(request.request_id)

    def finish_with_error(self, request: Request) -> None:
        if not request.is_finished:
            self._finish(request, FinishReason.ERROR)


def add_prompt_logprobs(request: Request, chunk: PromptLogprobChunk) -> None:
    """Files a chunk (index = prompt position; position 0 has none). A request recomputed from position
    0 (preempted mid-prompt) starts its list again."""
    rows = request.prompt_logprob_rows
    if rows is None or chunk.start == 0:
        rows = request.prompt_logprob_rows = [None]
    del rows[chunk.start + 1 :]
    rows.extend(chunk.rows)
