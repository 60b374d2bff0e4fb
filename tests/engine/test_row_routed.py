"""float16 on CPU, routed by row count: few rows take the float16 kernel, more rows multiply in float32 and
round once to float16, other dtypes are untouched, and a float16 engine decodes like float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.layers import row_routed
from engine.layers.embedding import LMHead, VocabEmbedding
from engine.layers.linear import Linear, MergedLinear
from engine.request import Request
from protocol.messages import SamplingParams
from tests.engine.conftest import TinyModelDir


def _fp16_linear(bias: bool) -> Linear:
    torch.manual_seed(0)
    return MergedLinear(64, [32, 16, 16], bias=bias).to(torch.float16)


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_take_the_float16_kernel(bias: bool) -> None:
    layer = _fp16_linear(bias)
    for rows in range(1, row_routed.MAX_FP16_ROWS + 1):
        x = torch.randn(rows, 64, dtype=torch.float16)
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("bias", [False, True])
def test_more_rows_multiply_in_float32_and_round_once(bias: bool) -> None:
    layer = _fp16_linear(bias)
    x = torch.randn(row_routed.MAX_FP16_ROWS + 1, 64, dtype=torch.float16)
    b = None if layer.bias is None else layer.bias.float()
    exact = nn.functional.linear(x.float(), layer.weight.float(), b)
    out = layer(x)
    assert out.dtype == torch.float16 and torch.equal(out, exact.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_dtypes_are_plain_nn_linear(dtype: torch.dtype) -> None:
    layer = Linear(64, 48, bias=True).to(dtype)
    assert isinstance(layer, nn.Linear)
    x = torch.randn(9, 64, dtype=dtype)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("num_rows", [1, 2, 3, 16])
def test_float16_lm_head_matches_float32_products(num_rows: int) -> None:
    torch.manual_seed(num_rows)
    vocab = 2 * row_routed.LM_HEAD_BLOCK + 77  # the upcast runs in three blocks, the last one short
    embedding = VocabEmbedding(vocab, 64).to(torch.float16)
    head = LMHead(64, vocab, tied_embedding=embedding)
    hidden = torch.randn(num_rows, 64, dtype=torch.float16)
    logits = head(hidden)
    assert logits.shape == (num_rows, vocab) and logits.dtype == torch.float32
    exact = nn.functional.linear(hidden.float(), embedding.weight.float())
    if num_rows > row_routed.MAX_FP16_ROWS:
        assert torch.equal(logits, exact)  # blocking the upcast changes no bits
    else:  # the float16 kernel rounds each logit to float16
        torch.testing.assert_close(logits, exact, rtol=2e-3, atol=2e-3)


def test_float16_engine_decodes_like_float32(tiny_model_dir: TinyModelDir) -> None:
    def greedy(dtype: str, prompts: list[list[int]]) -> list[list[int]]:
        config = EngineConfig(model=str(tiny_model_dir("llama")), dtype=dtype, kv_cache_memory=8 * 2**20)
        parts = build_engine_parts(config)
        assert parts.ready.model_dtype == dtype
        sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        requests = [Request(f"r{i}", b"c", p, sampling, 0.0) for i, p in enumerate(prompts)]
        for request in requests:
            parts.scheduler.add_request(request)
        while any(r.num_output_tokens < 8 for r in requests):
            out = parts.scheduler.schedule()
            parts.scheduler.update_from_output(out, parts.runner.execute(out))
        return [list(r.output_token_ids) for r in requests]

    # One sequence decodes 1-row steps (float16 kernel); MAX_FP16_ROWS + 1 decode with the float32 upcast;
    # both prefill through the upcast. A tiny model's margins are wide enough for the same tokens.
    wide = [[5 + i, 6, 7, 8, 9] for i in range(row_routed.MAX_FP16_ROWS + 1)]
    for prompts in ([[5, 6, 7, 8, 9, 10]], wide):
        assert greedy("float16", prompts) == greedy("float32", prompts)
