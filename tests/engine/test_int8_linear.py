"""Int8 weight copies for few-row CPU steps (--cpu-int8-weights): the int8 product is the product with the
dequantized weights, bigger batches keep the bf16 weights, and an engine built with the flag decodes."""

from __future__ import annotations

import torch
from torch import nn

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.layers.int8_linear import Int8DecodeLinear, use_int8_for_small_batches
from engine.layers.linear import MergedLinear
from engine.request import Request
from protocol.messages import SamplingParams
from tests.engine.conftest import TinyModelDir


def test_int8_rows_use_the_dequantized_weight_and_bigger_batches_the_original() -> None:
    torch.manual_seed(0)
    linear = MergedLinear(64, [32, 16, 16], bias=True).to(torch.bfloat16)
    wrapped = Int8DecodeLinear(linear, max_int8_rows=4)
    assert wrapped.output_sizes == [32, 16, 16] and wrapped.qweight.dtype == torch.int8
    dequantized = wrapped.qweight.float() * wrapped.scales.float()[:, None]
    # Per-row symmetric int8: every weight within half a step of the original, plus what rounding the
    # scale to bf16 (8 significant bits) moves the largest code (127) by.
    bound = wrapped.scales.float()[:, None] * (0.5 + 127 * 2**-8)
    assert bool(((dequantized - linear.weight.float()).abs() <= bound).all())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = x.float() @ dequantized.T + linear.bias.float()
    torch.testing.assert_close(wrapped(x).float(), expected, rtol=2e-2, atol=2e-2)
    big = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(wrapped(big), nn.functional.linear(big, linear.weight, linear.bias))


def test_engine_with_int8_weights_decodes_like_bf16(tiny_model_dir: TinyModelDir) -> None:
    def greedy(flag: bool) -> list[int]:
        config = EngineConfig(
            model=str(tiny_model_dir("llama")),
            dtype="bfloat16",
            kv_cache_memory=8 * 2**20,
            cpu_int8_weights=flag,
        )
        parts = build_engine_parts(config)
        wrapped = [m for m in parts.runner.model.modules() if isinstance(m, Int8DecodeLinear)]
        assert len(wrapped) == (4 * 2 if flag else 0)  # qkv, o, gate/up, down in each of the 2 layers
        sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        request = Request("r", b"c", [5, 6, 7, 8, 9, 10], sampling, 0.0)
        parts.scheduler.add_request(request)
        while request.num_output_tokens < 8:
            out = parts.scheduler.schedule()
            parts.scheduler.update_from_output(out, parts.runner.execute(out))
        return list(request.output_token_ids)

    assert greedy(True) == greedy(False)  # a tiny model's margins are wide enough for the same tokens


def test_only_linear_layers_are_wrapped() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4, bias=False)))
    assert use_int8_for_small_batches(model.to(torch.bfloat16)) == 2
    assert isinstance(model[0], nn.Embedding) and isinstance(model[2][0], Int8DecodeLinear)
