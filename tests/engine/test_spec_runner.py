"""The runner's verify path on a tiny real model: the argmax at each draft position equals what decoding
the same tokens one at a time samples, and such a step can never replay a 1-token CUDA graph."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.engine_setup import build_engine_parts
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.spec.config import SpeculativeConfig
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, SamplingParams

SPEC = {"num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}


def test_draft_targets_equal_one_token_decoding(tiny_model_dir: Callable[[str], Path]) -> None:
    config = EngineConfig(
        model=str(tiny_model_dir("llama")),
        kv_cache_memory=8 * 2**20,
        enforce_eager=True,
        speculative_config=SPEC,  # type: ignore[arg-type]
    )
    stepper = EngineStepper(build_engine_parts(config))
    scheduler, runner = stepper.scheduler, stepper.runner
    assert scheduler.speculative == SpeculativeConfig(3, 2, 1)  # threaded from the config
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompt = [(7 * i) % 400 + 10 for i in range(12)]
    assert stepper.add(AddRequest("r", prompt, params, time.time()), b"test", []) is None
    plan = scheduler.schedule()
    scheduler.update_from_output(plan, runner.execute(plan))
    request = scheduler.requests["r"]
    assert request.num_computed_tokens == 12 and request.num_output_tokens == 1

    drafts = (21, 22, 23)
    assert scheduler.kv_cache.allocate_slots(request, 1 + len(drafts))
    verify = SchedulerOutput([ScheduledRequest(request, 4, 12, False, False, drafts)])
    _, _, meta = runner._build_inputs(verify)
    decode = SchedulerOutput([ScheduledRequest(request, 1, 12, True, False)])
    _, _, decode_meta = runner._build_inputs(decode)
    graphs = DecodeGraphs(
        runner.model,
        runner.kv_caches,
        max_num_seqs=4,
        max_model_len=64,
        block_size=16,
        device=torch.device("cpu"),
    )
    assert meta.max_query_len == 4 and not graphs.can_run(meta, has_embeds=False)
    assert graphs.can_run(decode_meta, has_embeds=False)  # the check tells the two apart

    output = runner.execute(verify)
    assert output.sampled == {} and len(output.draft_targets["r"]) == 4
    targets = output.draft_targets["r"]
    # Teacher forcing, one token per step: the request is moved by hand (the runner reads the plan).
    for i, draft in enumerate((*drafts, None)):
        one = runner.execute(SchedulerOutput([ScheduledRequest(request, 1, 12 + i, True, False)]))
        assert one.sampled["r"] == targets[i], i
        if draft is not None:
            request.output_token_ids.append(draft)
