"""LoRA adapters through the whole engine step loop (scheduler, KV cache, runner, sampler) on a tiny
Llama: each request's logprobs equal those of the transformers model with its adapter merged by peft,
for mixed batches of adapters and the base model, with prefix caching keyed by adapter."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, LoraAdapter, RequestDelta, SamplingParams, TokenLogprob
from tests.engine.lora_adapters import base_model, make_peft_adapter, merged_model, reference_logprobs

VOCAB = 512  # tests/engine/conftest.py TINY_SHAPE
ATOL = 2e-4  # float32 engine vs float32 transformers, log-probabilities


@dataclass
class LoraSetup:
    model_dir: Path
    adapters: dict[str, Path]  # name -> PEFT folder
    references: dict[str | None, torch.nn.Module]  # adapter name (None: base) -> transformers model


@pytest.fixture(scope="module")
def lora_setup(tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> LoraSetup:
    model_dir = tiny_model_dir("llama")
    folder = tmp_path_factory.mktemp("lora")
    adapters = {
        "all-proj": make_peft_adapter(base_model(model_dir), folder / "all-proj", seed=1, rank=8, alpha=16),
        "qv-down": make_peft_adapter(
            base_model(model_dir),
            folder / "qv-down",
            seed=2,
            rank=4,
            alpha=8,
            targets=["q_proj", "v_proj", "down_proj"],
            use_rslora=True,
        ),
    }
    references: dict[str | None, torch.nn.Module] = {None: base_model(model_dir)}
    references.update({name: merged_model(model_dir, path) for name, path in adapters.items()})
    return LoraSetup(model_dir, adapters, references)


def lora_stepper(setup: LoraSetup, **config: object) -> EngineStepper:
    modules = tuple((name, str(path), None) for name, path in setup.adapters.items())
    options: dict[str, object] = {
        "enable_lora": True,
        "lora_modules": modules,
        "max_lora_rank": 8,
        "max_loras": 2,
        "dtype": "float32",
        **config,
    }
    parts = build_engine_parts(EngineConfig(model=str(setup.model_dir), **options))  # type: ignore[arg-type]
    return EngineStepper(parts)


@pytest.fixture(scope="module")
def stepper(lora_setup: LoraSetup) -> EngineStepper:
    return lora_stepper(lora_setup)


def prompt(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, VOCAB, (length,), generator=gen).tolist()


def add(
    stepper: EngineStepper, request_id: str, prompt_ids: list[int], lora: str | None, **sampling: object
) -> None:
    params = SamplingParams(**{"max_tokens": 4, "temperature": 0.0, "ignore_eos": True, **sampling})  # type: ignore[arg-type]
    rejection = stepper.add(AddRequest(request_id, prompt_ids, params, time.time(), lora_name=lora), b"t", [])
    assert rejection is None, rejection


def run(stepper: EngineStepper, max_steps: int = 500) -> dict[str, list[RequestDelta]]:
    deltas: dict[str, list[RequestDelta]] = {}
    for _ in range(max_steps):
        if not stepper.has_work:
            break
        for _client, delta in stepper.step():
            deltas.setdefault(delta.request_id, []).append(delta)
    assert not stepper.has_work
    kv = stepper.scheduler.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks - 1, "blocks leaked"
    return deltas


def tokens(deltas: list[RequestDelta]) -> list[int]:
    assert all(d.error is None for d in deltas), deltas[-1].error
    return [t for d in deltas for t in d.new_token_ids]


def dense(row: TokenLogprob) -> torch.Tensor:
    """A logprob entry that lists the whole vocabulary as a [vocab] tensor."""
    out = torch.full((VOCAB,), float("nan"))
    out[torch.tensor(row.top_ids)] = torch.tensor(row.top_logprobs)
    assert not out.isnan().any()
    return out


def check_against_reference(
    setup: LoraSetup, lora: str | None, prompt_ids: list[int], deltas: list[RequestDelta]
) -> None:
    """Prompt logprobs at every position and each generated token's full logprobs equal the reference's."""
    generated = tokens(deltas)
    reference = reference_logprobs(setup.references[lora], prompt_ids + generated)  # [n, V]
    prompt_rows = deltas[0].prompt_logprobs
    assert prompt_rows is not None and prompt_rows[0] is None
    engine_prompt = torch.stack([dense(row) for row in prompt_rows[1:] if row is not None])
    torch.testing.assert_close(engine_prompt, reference[: len(prompt_ids) - 1], atol=ATOL, rtol=0)
    engine_generated = torch.stack([dense(lp) for d in deltas for lp in d.logprobs or []])
    expected = reference[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(generated)]
    torch.testing.assert_close(engine_generated, expected, atol=ATOL, rtol=0)
    assert generated == expected.argmax(dim=-1).tolist()  # greedy, so the reference picks the same


def test_a_mixed_batch_matches_each_merged_reference(lora_setup: LoraSetup, stepper: EngineStepper) -> None:
    """Base, adapter 1 and adapter 2 in the same steps: each equals its own merged model."""
    cases = {
        "base": (None, prompt(1, 21)),
        "one": ("all-proj", prompt(2, 17)),
        "two": ("qv-down", prompt(3, 30)),
    }
    cases["one-again"] = ("all-proj", prompt(4, 9))
    for request_id, (lora, ids) in cases.items():
        add(stepper, request_id, ids, lora, logprobs=VOCAB, prompt_logprobs=VOCAB)
    before = stepper.max_step_num_seqs
    deltas = run(stepper)
    assert stepper.max_step_num_seqs >= max(before, len(cases))  # they ran together
    for request_id, (lora, ids) in cases.items():
        check_against_reference(lora_setup, lora, ids, deltas[request_id])


def test_the_adapters_really_change_the_output(lora_setup: LoraSetup) -> None:
    # Guards the test itself: adapters too small to matter would make the comparisons above vacuous.
    ids = prompt(5, 12)
    base = reference_logprobs(lora_setup.references[None], ids)
    for name in lora_setup.adapters:
        assert (reference_logprobs(lora_setup.references[name], ids) - base).abs().max() > 0.05


def test_prefix_cache_never_shares_blocks_across_adapters(
    lora_setup: LoraSetup, stepper: EngineStepper
) -> None:
    ids = prompt(6, 50)  # three full blocks of 16, then 2 tokens: the first copied, the last recomputed
    expected_cached = 49
    order = [("base-1", None, 0), ("a-1", "all-proj", 0), ("a-2", "all-proj", expected_cached)]
    order += [("b-1", "qv-down", 0), ("base-2", None, expected_cached)]
    for request_id, lora, num_cached in order:
        add(stepper, request_id, ids, lora, max_tokens=6)
        deltas = run(stepper)[request_id]
        assert deltas[0].num_cached_tokens == num_cached, request_id
        reference = reference_logprobs(lora_setup.references[lora], ids + tokens(deltas))
        assert tokens(deltas) == reference[len(ids) - 1 : -1].argmax(dim=-1).tolist(), request_id


def test_max_loras_keeps_other_adapters_waiting(lora_setup: LoraSetup) -> None:
    """With one slot, a request under a second adapter waits until the first adapter's requests end."""
    stepper = lora_stepper(lora_setup, max_loras=1)
    cases = {"a": ("all-proj", prompt(7, 10)), "b": ("qv-down", prompt(8, 11)), "base": (None, prompt(9, 12))}
    for request_id, (lora, ids) in cases.items():
        add(stepper, request_id, ids, lora, max_tokens=3, logprobs=VOCAB, prompt_logprobs=VOCAB)
    first = {d.request_id: [d] for _, d in stepper.step()}
    running = {r.request_id for r in stepper.scheduler.running}
    assert running == {"a", "base"}  # b waits for the slot, the base request does not
    rest = run(stepper)
    for request_id, (lora, ids) in cases.items():
        check_against_reference(lora_setup, lora, ids, first.get(request_id, []) + rest[request_id])


def test_an_unknown_adapter_is_a_404_naming_the_model(stepper: EngineStepper) -> None:
    params = SamplingParams(max_tokens=2)
    rejection = stepper.add(AddRequest("nope", [11, 12], params, time.time(), lora_name="no-such"), b"t", [])
    assert rejection is not None and rejection.error_status == 404
    assert "no-such" in (rejection.error or "")


def test_an_engine_without_lora_answers_404_for_an_adapter(tiny_model_dir: Callable[[str], Path]) -> None:
    parts = build_engine_parts(EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32"))
    assert parts.lora is None and not parts.ready.enable_lora
    rejection = EngineStepper(parts).add(
        AddRequest("x", [11, 12], SamplingParams(max_tokens=2), time.time(), lora_name="all-proj"), b"t", []
    )
    assert rejection is not None and rejection.error_status == 404
    assert "all-proj" in (rejection.error or "")


def test_ready_lists_the_start_up_adapters(stepper: EngineStepper) -> None:
    ready = stepper.parts.ready
    assert ready.enable_lora and ready.max_lora_rank == 8
    assert {(a.name, a.rank) for a in ready.lora_adapters} == {("all-proj", 8), ("qv-down", 4)}


def test_load_and_unload_between_steps_leave_running_requests_alone(
    lora_setup: LoraSetup, stepper: EngineStepper, tmp_path: Path
) -> None:
    """A malformed load fails alone; an unloaded adapter's running request finishes under its weights;
    new requests for it get 404; loading it again under a new name serves it."""
    from engine.lora.adapter import LoraError

    lora = stepper.parts.lora
    assert lora is not None
    ids = prompt(10, 20)
    add(stepper, "running", ids, "all-proj", max_tokens=8, logprobs=VOCAB, prompt_logprobs=VOCAB)
    deltas: list[RequestDelta] = []
    for _ in range(3):
        deltas += [d for _, d in stepper.step()]
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraError) as bad:
        lora.load(LoraAdapter("broken", str(tmp_path)))
    assert bad.value.status == 400 and "broken" not in lora.adapters
    lora.unload("all-proj")
    rejection = stepper.add(
        AddRequest("late", ids, SamplingParams(max_tokens=2), time.time(), lora_name="all-proj"), b"t", []
    )
    assert rejection is not None and rejection.error_status == 404
    deltas += run(stepper)["running"]
    check_against_reference(lora_setup, "all-proj", ids, deltas)
    with pytest.raises(LoraError) as unknown:
        lora.unload("all-proj")
    assert unknown.value.status == 404
    lora.load(LoraAdapter("all-proj", str(lora_setup.adapters["all-proj"])))  # back, for later tests
    add(stepper, "again", ids, "all-proj", max_tokens=8, logprobs=VOCAB, prompt_logprobs=VOCAB)
    check_against_reference(lora_setup, "all-proj", ids, run(stepper)["again"])


def test_qwen2_with_attention_bias_matches_its_merged_reference(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """Another family: Qwen2's q/k/v carry biases, which the LoRA delta must leave to the base layer."""
    model_dir = tiny_model_dir("qwen2")
    adapter = make_peft_adapter(base_model(model_dir), tmp_path / "qwen2-lora", seed=4, rank=8)
    setup = LoraSetup(model_dir, {"q2": adapter}, {"q2": merged_model(model_dir, adapter)})
    setup.references[None] = base_model(model_dir)
    stepper = lora_stepper(setup)
    cases = {"adapter": ("q2", prompt(11, 19)), "base": (None, prompt(12, 14))}
    for request_id, (lora, ids) in cases.items():
        add(stepper, request_id, ids, lora, logprobs=VOCAB, prompt_logprobs=VOCAB)
    deltas = run(stepper)
    for request_id, (lora, ids) in cases.items():
        check_against_reference(setup, lora, ids, deltas[request_id])


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"enable_lora": False}, "--lora-modules needs --enable-lora"),
        ({"max_loras": 2, "max_cpu_loras": 1}, "--max-cpu-loras >= --max-loras"),
        ({"max_lora_rank": 4}, "above --max-lora-rank 4"),  # the rank-8 adapter
    ],
)
def test_start_up_refuses_inconsistent_lora_flags(lora_setup: LoraSetup, options: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        lora_stepper(lora_setup, **options)
