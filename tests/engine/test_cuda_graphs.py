"""CUDA-graph decode: sizes on any machine; capture and equality with eager decode on a CUDA device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.cuda_graphs import capture_sizes


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert capture_sizes(10_000)[-1] == 512


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_decode_equals_eager_decode_on_cuda(tiny_model_dir: Callable[[str], Path]) -> None:
    import time

    from engine.config import EngineConfig
    from engine.engine_setup import build_engine_parts
    from engine.stepper import EngineStepper
    from protocol.messages import AddRequest, SamplingParams

    outputs = []
    for enforce_eager in (True, False):
        parts = build_engine_parts(
            EngineConfig(
                model=str(tiny_model_dir("llama")),
                device="cuda",
                dtype="float32",  # greedy tokens of a random model are compared: no bf16 near-ties
                enforce_eager=enforce_eager,
                max_num_seqs=8,
            )
        )
        assert (parts.runner.graphs is None) == enforce_eager
        stepper = EngineStepper(parts)
        for i in range(5):
            sampling = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
            stepper.add(AddRequest(f"r{i}", list(range(10 + i, 30 + 2 * i)), sampling, time.time()), b"t", [])
        tokens: dict[str, list[int]] = {}
        while stepper.has_work:
            for _client, delta in stepper.step():
                tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        outputs.append(tokens)
    assert outputs[0] == outputs[1]
