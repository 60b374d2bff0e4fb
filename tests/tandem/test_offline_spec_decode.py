"""Speculative decoding on the default model: greedy output is the same token for token, with drafts
accepted; a sampled request in the same steps is untouched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from engine.scheduler import Scheduler, SchedulerOutput
from engine.spec.config import SpeculativeConfig
from engine.stepper import EngineStepper
from tandem import LLM, SamplingParams

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
QUOTE = (
    "The committee met on Monday. It approved the budget for the new library, "
    "and it asked the mayor to open the library in June."
)
PROMPTS = [
    f"<|im_start|>user\nRename add to plus and repeat the code:\n{CODE}<|im_end|>\n<|im_start|>assistant\n",
    f"<|im_start|>user\nQuote this text exactly:\n{QUOTE}<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@contextmanager
def speculating(llm: LLM, plans: list[SchedulerOutput] | None = None) -> Iterator[Scheduler]:
    """The shared offline model with n-gram speculation (K=4, lookup 3..1) for the block; records plans."""
    scheduler = cast(EngineStepper, llm.stepper).scheduler
    schedule = scheduler.schedule

    def recording() -> SchedulerOutput:
        plan = schedule()
        if plans is not None:
            plans.append(plan)
        return plan

    scheduler.speculative = SpeculativeConfig(4, 3, 1)
    scheduler.schedule = recording  # type: ignore[method-assign]
    drafts, accepted = scheduler.num_draft_tokens, scheduler.num_accepted_tokens
    try:
        yield scheduler
    finally:
        del scheduler.schedule
        scheduler.speculative = None
    assert scheduler.num_draft_tokens >= drafts and scheduler.num_accepted_tokens >= accepted


def test_greedy_output_is_the_same_with_speculation(offline_llm: LLM) -> None:
    plain = offline_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    plans: list[SchedulerOutput] = []
    with speculating(offline_llm, plans) as scheduler:
        before = scheduler.num_accepted_tokens
        fast = offline_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        accepted = scheduler.num_accepted_tokens - before
    for a, b in zip(plain, fast, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].text == a.outputs[0].text
    assert accepted > 0
    assert len(plans) < 40  # fewer steps than tokens: several tokens per step


def test_a_sampled_request_shares_steps_with_a_speculating_one(offline_llm: LLM) -> None:
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=24)  # its own generator: batch-independent
    params = [GREEDY, seeded]
    plain = offline_llm.generate(PROMPTS, params, use_tqdm=False)
    plans: list[SchedulerOutput] = []
    with speculating(offline_llm, plans):
        fast = offline_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in plain]
    mixed = [p for p in plans if any(r.drafts for r in p.rows) and any(r.samples for r in p.rows)]
    assert mixed, "no step ran a row with drafts next to a sampling row"
