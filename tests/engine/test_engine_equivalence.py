"""The whole engine step loop (scheduler + KV cache + runner + sampler) on tiny real models:
greedy output equals transformers, and is unchanged by chunked prefill, prefix caching and preemption."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.stepper import EngineStepper
from protocol.messages import ITERATION_TOKENS_BUCKETS, AddRequest, RequestDelta, SamplingParams

PROMPT_LENGTHS = (5, 23, 40, 9, 61)
MAX_TOKENS = 32


def prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # ids from 10 up: avoids special tokens (EOS) so every request runs its full length
    return [torch.randint(10, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def run_engine(
    model_dir: Path,
    token_prompts: list[list[int]],
    on_delta: Callable[[RequestDelta], None] | None = None,
    arrivals: list[tuple[int, int]] | None = None,
    **config: object,
) -> tuple[list[list[int]], EngineStepper]:
    """Greedy outputs of every prompt. arrivals: (step, priority) per prompt; default all at once, priority 0."""
    parts = build_engine_parts(EngineConfig(model=str(model_dir), **config))  # type: ignore[arg-type]
    stepper = EngineStepper(parts)
    arrivals = arrivals or [(0, 0)] * len(token_prompts)
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(token_prompts))}
    for step in range(2000):
        for i, (prompt, (arrival_step, priority)) in enumerate(zip(token_prompts, arrivals, strict=True)):
            if arrival_step == step:
                sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
                request = AddRequest(f"r{i}", prompt, sampling, time.time(), priority=priority)
                assert stepper.add(request, b"test", []) is None
        if not stepper.has_work and step > max(s for s, _ in arrivals):
            break
        for _client, delta in stepper.step():
            outputs[delta.request_id].extend(delta.new_token_ids)
            if on_delta is not None:
                on_delta(delta)
    kv = parts.scheduler.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks - 1, "blocks leaked"
    return [outputs[f"r{i}"] for i in range(len(token_prompts))], stepper


def transformers_greedy(model_dir: Path, token_prompts: list[list[int]]) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for prompt in token_prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                min_new_tokens=MAX_TOKENS,
            )
        outs.append(gen[0, len(prompt) :].tolist())
    return outs


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    token_prompts = prompts(512)
    return token_prompts, transformers_greedy(llama_dir, token_prompts)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_batched_greedy_matches_transformers(tiny_model_dir: Callable[[str], Path], variant: str) -> None:
    model_dir = tiny_model_dir(variant)
    token_prompts = prompts(512, seed=1)
    ours, stepper = run_engine(model_dir, token_prompts, dtype="float32")
    assert ours == transformers_greedy(model_dir, token_prompts)
    assert stepper.max_step_num_seqs == len(token_prompts)  # all prompts ran in one batch


def test_chunked_prefill_gives_the_same_tokens(llama_dir: Path, reference: tuple) -> None:
    token_prompts, expected = reference
    ours, stepper = run_engine(llama_dir, token_prompts, dtype="float32", max_num_batched_tokens=16)
    assert ours == expected
    assert stepper.step_count > MAX_TOKENS + sum(PROMPT_LENGTHS) // 16 - 1  # prompts really were chunked


def test_prefix_caching_on_and_off_give_the_same_tokens(llama_dir: Path, reference: tuple) -> None:
    token_prompts, expected = reference
    shared = token_prompts[4][:48]
    with_prefix = [shared + p for p in token_prompts[:3]]
    cached_out, stepper = run_engine(llama_dir, with_prefix, dtype="float32", max_num_seqs=1)
    uncached_out, _ = run_engine(
        llama_dir, with_prefix, dtype="float32", max_num_seqs=1, enable_prefix_caching=False
    )
    assert cached_out == uncached_out
    assert stepper.scheduler.kv_cache.num_hit_tokens >= 2 * 48  # 2nd and 3rd request reused the prefix


def test_preemption_under_a_tiny_kv_budget_keeps_outputs(llama_dir: Path, reference: tuple) -> None:
    token_prompts, expected = reference
    # 61 + 32 tokens need 6 blocks of 16; 12 usable blocks cannot hold all five requests at once.
    preempted: dict[str, int] = {}

    def on_delta(delta: RequestDelta) -> None:
        if delta.finish_reason is not None:
            preempted[delta.request_id] = delta.num_preemptions

    ours, stepper = run_engine(
        llama_dir, token_prompts, on_delta, dtype="float32", num_gpu_blocks_override=13
    )
    assert stepper.scheduler.num_preemptions > 0
    assert ours == expected
    # vllm:request_num_preemptions: each finishing delta carries its request's count; they add up.
    assert len(preempted) == len(token_prompts)
    assert sum(preempted.values()) == stepper.scheduler.num_preemptions


def test_step_stats_count_iteration_tokens(llama_dir: Path, reference: tuple) -> None:
    """vllm:iteration_tokens_total: one count per step in the bucket of its token count, and the sum of
    all tokens scheduled (prompts once, then one per decode step, with no preemption here)."""
    token_prompts, _expected = reference
    _ours, stepper = run_engine(llama_dir, token_prompts, dtype="float32", max_num_batched_tokens=64)
    stats = stepper.stats()
    assert len(stats.iteration_tokens_counts) == len(ITERATION_TOKENS_BUCKETS) + 1
    assert sum(stats.iteration_tokens_counts) == stats.step == stepper.step_count
    # Each request's last sampled token is never fed back, so it computes prompt + MAX_TOKENS - 1 tokens.
    assert stats.iteration_tokens_sum == sum(len(p) + MAX_TOKENS - 1 for p in token_prompts)
    assert stats.iteration_tokens_counts[-1] == 0 and stats.iteration_tokens_counts[0] > 0  # 1-token steps
    assert stats.num_waiting_deferred == 0


def test_priority_preemption_under_a_tiny_kv_budget_keeps_outputs(llama_dir: Path, reference: tuple) -> None:
    # Low-priority requests start first and high-priority ones join later, so the preemption victim is
    # often a request already scheduled in the same step: it must leave that step's batch (it used to
    # stay there without blocks, and the runner's IndexError failed every request of the step).
    token_prompts, expected = reference
    ours, stepper = run_engine(
        llama_dir,
        token_prompts,
        arrivals=[(0, 5), (0, 5), (0, 5), (3, 0), (3, 0)],
        dtype="float32",
        num_gpu_blocks_override=13,
        scheduling_policy="priority",
    )
    assert stepper.scheduler.num_preemptions > 0
    assert ours == expected
