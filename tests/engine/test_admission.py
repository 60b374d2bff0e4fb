"""Admission control is on by default: without --max-waiting-requests the engine bounds its waiting queue
by its KV cache; ten times that many requests get 503 past the bound and every accepted one completes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from engine.config import EngineConfig
from engine.engine_setup import MIN_DEFAULT_WAITING_REQUESTS, build_engine_parts
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, FinishReason, SamplingParams


def test_the_default_bound_comes_from_the_kv_cache(tiny_model_dir: Callable[[str], Path]) -> None:
    model = str(tiny_model_dir("llama"))
    big = build_engine_parts(EngineConfig(model=model, kv_cache_memory=32 * 1024**2, max_model_len=64))
    assert big.ready.num_kv_blocks > MIN_DEFAULT_WAITING_REQUESTS
    assert big.ready.max_waiting_requests == big.ready.num_kv_blocks
    flagged = build_engine_parts(
        EngineConfig(model=model, kv_cache_memory=2 * 1024**2, max_waiting_requests=7)
    )
    assert flagged.ready.max_waiting_requests == 7


def test_ten_times_the_bound_is_refused_past_it_and_the_rest_completes(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    config = EngineConfig(model=str(tiny_model_dir("llama")), kv_cache_memory=2 * 1024**2, max_model_len=64)
    parts = build_engine_parts(config)
    bound = parts.ready.max_waiting_requests
    assert bound == max(MIN_DEFAULT_WAITING_REQUESTS, parts.ready.num_kv_blocks)
    stepper = EngineStepper(parts, max_waiting_requests=bound)  # as EngineCore builds it
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    refused = 0
    for i in range(10 * bound):
        rejection = stepper.add(AddRequest(f"r{i}", [11, 12, 13 + i % 100], sampling, time.time()), b"c", [])
        if rejection is not None:
            assert rejection.error_status == 503 and rejection.finish_reason == FinishReason.ERROR
            refused += 1
    assert refused == 9 * bound
    finished = 0
    while stepper.has_work:
        finished += sum(
            d.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) for _, d in stepper.step()
        )
    assert finished == bound
    kv = parts.scheduler.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks - 1
