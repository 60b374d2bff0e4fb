"""CPU decode graphs (engine/cpu_graphs.py): the default model (--dtype auto, and an explicit float32 with
its exact kernel) records its decode steps' kernel calls and replays them; the tokens and logits equal eager decoding exactly, for every row count
and as sequences join and finish; a step whose model computes in torch is refused and runs eagerly."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.cpu_graphs import CpuDecodeGraphs
from engine.engine_setup import EngineParts, build_engine_parts
from engine.request import Request
from protocol.messages import SamplingParams
from tests.engine.cpu_kernels import require_cpu_kernels


@pytest.fixture(scope="module")
def kernels() -> None:
    require_cpu_kernels()


def _parts(enforce_eager: bool, dtype: str = "auto") -> EngineParts:
    config = EngineConfig(
        dtype=dtype,
        max_num_seqs=8,
        kv_cache_memory=64 * 2**20,
        enable_prefix_caching=False,
        enforce_eager=enforce_eager,
    )
    return build_engine_parts(config)


def _decode(parts: EngineParts, prompts: list[list[int]], lengths: list[int]) -> dict[str, list[int]]:
    """Greedy tokens of each prompt (max_tokens from lengths), all submitted together; rows finish at
    different steps, so the decode batch shrinks through several row counts."""
    scheduler, runner = parts.scheduler, parts.runner
    for i, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
        sampling = SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True)
        scheduler.add_request(Request(f"r{i}", b"test", prompt, sampling, 0.0))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while scheduler.running or scheduler.num_waiting:
        out = scheduler.schedule()
        result = runner.execute(out)
        for request_id, token in result.sampled.items():
            tokens[request_id].append(token)
        scheduler.update_from_output(out, result)
    return tokens


@pytest.mark.parametrize("dtype", ["auto", "float32"])  # the integer block kernel; the exact float32 one
def test_replayed_decode_steps_equal_eager_ones(kernels: None, dtype: str) -> None:
    graphed, eager = _parts(enforce_eager=False, dtype=dtype), _parts(enforce_eager=True, dtype=dtype)
    graphs = graphed.runner.graphs
    assert isinstance(graphs, CpuDecodeGraphs) and eager.runner.graphs is None
    prompts = [[1, 504, 3575, 282, 4649, 314], [1, 22, 33, 44], [7] * 40, [1, 9, 8, 7, 6, 5, 4], [2, 300]]
    lengths = [12, 3, 9, 6, 1]
    assert _decode(graphed, prompts, lengths) == _decode(eager, prompts, lengths)
    assert graphs.enabled and {4, 3, 2, 1} <= set(graphs.calls)  # rows finishing: 4 decode rows, then fewer
    assert all(len(calls) > 200 for calls in graphs.calls.values())  # ~10 kernels per layer, 30 layers


def test_a_replay_reads_the_new_inputs_and_matches_the_model_bit_for_bit(kernels: None) -> None:
    parts = _parts(enforce_eager=False)
    _decode(parts, [[1, 504, 3575, 282], [5, 6, 7, 8, 9]], [4, 4])  # captures 2 rows, fills blocks
    runner, graphs = parts.runner, parts.runner.graphs
    assert isinstance(graphs, CpuDecodeGraphs) and 2 in graphs.calls
    from tests.engine.conftest import PagedBatchBuilder

    builder = PagedBatchBuilder(num_blocks=runner.kv_caches[0].shape[1], block_size=runner.block_size, seed=3)
    builder.step({0: 20, 1: 35})  # contexts for two new sequences, blocks from a fresh shuffle
    for ids in ([11, 12], [400, 17]):
        meta, positions = builder.step({0: 1, 1: 1})
        input_ids = torch.tensor(ids)
        with torch.inference_mode():
            expected = runner.model(input_ids, positions, runner.kv_caches, meta).clone()
            got = graphs.run(input_ids, positions, meta)
        assert got is not None and torch.equal(got, expected)


def test_a_model_that_computes_in_torch_is_refused_and_decodes_eagerly(
    kernels: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts, eager = _parts(enforce_eager=False), _parts(enforce_eager=True)
    mlp = parts.runner.model.model.layers[3].mlp
    forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda x: forward(x) * 1.0)  # a torch multiply: not a kernel
    mlp_eager = eager.runner.model.model.layers[3].mlp
    forward_eager = mlp_eager.forward
    monkeypatch.setattr(mlp_eager, "forward", lambda x: forward_eager(x) * 1.0)
    prompts, lengths = [[1, 504, 3575, 282], [1, 22, 33]], [5, 5]
    assert _decode(parts, prompts, lengths) == _decode(eager, prompts, lengths)
    graphs = parts.runner.graphs
    assert isinstance(graphs, CpuDecodeGraphs) and not graphs.enabled and not graphs.calls
