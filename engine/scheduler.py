"""Continuous-batching scheduler: one token budget per step, running requests first, then waiting ones.

No prefill/decode phases: each step maps request -> number of tokens to compute. A long prompt is
chunked across steps; when KV blocks run out the newest (or lowest-priority) running request is
preempted and recomputed later. No torch here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus
from protocol.messages import FinishReason


@dataclass
class SchedulerOutput:
    # Requests in batch order with the number of tokens each computes this step.
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    long_prefill_token_threshold: int | None = None
    priority_policy: bool = False
    max_loras: int | None = None  # --max-loras with LoRA on: distinct adapters running at once


class Scheduler:
    def __init__(self, limits: SchedulerLimits, kv_cache: KVCacheManager) -> None:
        self.limits = limits
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

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
                out.scheduled.append((request, num_new))
                budget -= num_new
                index += 1
        return budget

    @staticmethod
    def _unschedule(out: SchedulerOutput, request: Request) -> int:
        """Remove request from this step's batch (if there); returns the tokens it had been given."""
        for position, (scheduled, num_tokens) in enumerate(out.scheduled):
            if scheduled is request:
                del out.scheduled[position]
                return num_tokens
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
            cached = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached) * self.kv_cache.block_size
            num_new = self._num_new_tokens(request, num_cached, budget)
            if not self.kv_cache.allocate_slots(request, num_new, cached):
                break  # wait for blocks to free up; keep FCFS order
            self.waiting.remove(request)
            self.kv_cache.record_prefix_lookup(request, len(cached))
            if request.queue_time_s is None:
                request.queue_time_s = time.monotonic() - request.received_at
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_cached
            self.running.append(request)
            out.scheduled.append((request, num_new))
            budget -= num_new

    # -- results --------------------------------------------------------------------------------------
    def update_after_step(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance progress, append sampled tokens, and finish requests that hit a stop. Returns finished."""
        finished = []
        for request, num_new in out.scheduled:
            if request.is_finished:  # aborted while the step ran
                continue
            request.num_computed_tokens += num_new
            self.kv_cache.cache_full_blocks(request)
            token_id = sampled.get(request.request_id)
            if token_id is None:
                continue  # a prefill chunk that has not reached the end of the prompt yet
            request.output_token_ids.append(token_id)
            reason = self._stop_reason(request, token_id)
            if reason is not None:
                self._finish(request, reason)
                finished.append(request)
        return finished

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
        self.kv_cache.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]

    def finish_with_error(self, request: Request) -> None:
        if not request.is_finished:
            self._finish(request, FinishReason.ERROR)
