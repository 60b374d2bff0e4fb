"""One step flows one way (issue 15, section 2): the runner turns a plan into data and changes no request;
the scheduler alone applies that data; the runner's one cross-step state (seeded generators) is released
through the plan. On a tiny real model, in process."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.request import Request
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, SamplingParams


def _stepper(model_dir: Path, **config: object) -> EngineStepper:
    settings: dict[str, object] = {"kv_cache_memory": 8 * 2**20, "enforce_eager": True, **config}
    return EngineStepper(build_engine_parts(EngineConfig(model=str(model_dir), **settings)))  # type: ignore[arg-type]


def _add(stepper: EngineStepper, request_id: str, prompt_len: int, **sampling: object) -> None:
    settings: dict[str, object] = {"max_tokens": 4, "ignore_eos": True, **sampling}
    params = SamplingParams(**settings)  # type: ignore[arg-type]
    prompt = [(7 * i) % 400 + 10 for i in range(prompt_len)]
    assert stepper.add(AddRequest(request_id, prompt, params, time.time()), b"test", []) is None


def _state(request: Request) -> dict[str, object]:
    fields = ("num_computed_tokens", "output_token_ids", "status", "finish_reason", "block_ids")
    more = ("sent_prompt_logprobs", "prompt_logprob_rows", "num_preemptions", "stop_reason")
    return copy.deepcopy({name: getattr(request, name) for name in fields + more})


def test_the_runner_changes_no_request(tiny_model_dir: Callable[[str], Path]) -> None:
    """Chunked prefill with prompt logprobs, then decodes: every execute leaves every request as it was;
    only update_from_output moves them, and prompt logprobs arrive once, whole, with the first token."""
    stepper = _stepper(tiny_model_dir("llama"), max_num_batched_tokens=16)
    _add(stepper, "lp", 40, temperature=0.0, prompt_logprobs=2, logprobs=1)
    _add(stepper, "seeded", 9, temperature=0.9, seed=3)
    scheduler, runner = stepper.scheduler, stepper.runner
    prompt_rows = []
    while scheduler.has_work:
        plan = scheduler.schedule()
        before = [_state(row.request) for row in plan.rows]
        output = runner.execute(plan)
        assert [_state(row.request) for row in plan.rows] == before
        assert set(output.sampled) == {row.request.request_id for row in plan.rows if row.samples}
        for update in scheduler.update_from_output(plan, output):
            assert update.error is None
            if update.prompt_logprobs is not None:
                prompt_rows.append(update.prompt_logprobs)
    assert len(prompt_rows) == 1 and len(prompt_rows[0]) == 40  # position 0 has none, then 39 rows
    assert prompt_rows[0][0] is None and all(row is not None for row in prompt_rows[0][1:])


def _tokens_of(stepper: EngineStepper, request_id: str) -> list[int]:
    tokens: list[int] = []
    while stepper.has_work:
        tokens += [t for _c, d in stepper.step() if d.request_id == request_id for t in d.new_token_ids]
    return tokens


def test_a_finished_seeded_request_releases_its_generator(tiny_model_dir: Callable[[str], Path]) -> None:
    stepper = _stepper(tiny_model_dir("llama"))
    sampler = stepper.runner.sampler
    _add(stepper, "seeded", 6, temperature=1.0, seed=11, max_tokens=3)
    first = _tokens_of(stepper, "seeded")
    assert len(first) == 3 and "seeded" in sampler.generators  # the runner hears of it with the next plan
    _add(stepper, "seeded", 6, temperature=1.0, seed=11, max_tokens=3)  # the same id again
    _add(stepper, "other", 6, temperature=0.0, max_tokens=1)
    plan = stepper.scheduler.schedule()
    assert plan.finished_request_ids == {"seeded"}
    output = stepper.runner.execute(plan)
    # Dropped before this step sampled, so the new request's generator starts from its seed again.
    stepper.scheduler.update_from_output(plan, output)
    second = [output.sampled["seeded"]] + _tokens_of(stepper, "seeded")
    assert second == first
    assert stepper.scheduler.schedule().finished_request_ids == set()  # an empty plan keeps the ids
    assert "seeded" in sampler.generators
