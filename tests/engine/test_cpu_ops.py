"""The CPU ops dispatch uses (engine/kernels/cpu_ops.py): RMSNorm, RMSNorm fused with the residual add,
neox rotary, SiLU-and-multiply, the KV cache write and decode attention run in C for float32 rows and equal
torch_ops' results up to float32 rounding (the cache write exactly); other layouts and dtypes take
torch_ops' path unchanged."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_ops, cpu_quant, dispatch, torch_ops
from engine.layers.rotary import build_cos_sin_cache
from tests.engine.cpu_kernels import require_cpu_kernels


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    require_cpu_kernels()


@pytest.mark.parametrize("rows", [1, 3, 100])  # 100: split across threads
@pytest.mark.parametrize("hidden", [576, 37])  # 37: a tail past the last full vector
def test_rms_norm_and_the_fused_residual_add_match_torch(rows: int, hidden: int) -> None:
    torch.manual_seed(rows)
    x, residual, weight = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.randn(hidden)
    torch.testing.assert_close(cpu_ops.rms_norm(x, weight, 1e-5), torch_ops.rms_norm(x, weight, 1e-5))
    normed, summed = cpu_ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_summed = torch_ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_summed)  # one float32 add per element, as torch
    torch.testing.assert_close(normed, ref_normed)
    assert summed.data_ptr() not in (x.data_ptr(), residual.data_ptr())  # the inputs are left as they were


@pytest.mark.parametrize("rot_dim", [64, 32])  # 32: rotary on the first half of each head only
@pytest.mark.parametrize("tokens", [1, 5, 80])
def test_neox_rotary_matches_torch_on_views_of_the_merged_projection(rot_dim: int, tokens: int) -> None:
    torch.manual_seed(tokens)
    head_dim, q_heads, kv_heads = 64, 9, 3
    cache = build_cos_sin_cache(rot_dim, 4096, 10000.0, None)
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim)  # as the qkv projection's output
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim)  # strided token rows
    positions = torch.randint(0, 4096, (tokens,))
    got_q, got_k = cpu_ops.rotary_embedding(positions, q, k, cache, True)
    ref_q, ref_k = torch_ops.rotary_embedding(positions, q, k, cache, True)
    torch.testing.assert_close(got_q, ref_q)
    torch.testing.assert_close(got_k, ref_k)


def test_other_dtypes_and_layouts_take_the_torch_path() -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(4, 64).half(), torch.randn(64).half()
    assert torch.equal(cpu_ops.rms_norm(x, weight, 1e-5), torch_ops.rms_norm(x, weight, 1e-5))
    strided = torch.randn(64, 4).t()  # not contiguous
    w32 = weight.float()
    assert torch.equal(cpu_ops.rms_norm(strided, w32, 1e-5), torch_ops.rms_norm(strided, w32, 1e-5))
    cache = build_cos_sin_cache(64, 128, 10000.0, None)
    q, k, positions = torch.randn(3, 2, 64), torch.randn(3, 1, 64), torch.tensor([0, 5, 7])
    for got, ref in zip(
        cpu_ops.rotary_embedding(positions, q, k, cache, False),  # interleaved (GPT-J) rotary
        torch_ops.rotary_embedding(positions, q, k, cache, False),
        strict=True,
    ):
        assert torch.equal(got, ref)


def test_dispatch_sends_cpu_tensors_to_the_cpu_ops() -> None:
    x, weight = torch.randn(2, 8), torch.randn(8)
    torch.testing.assert_close(dispatch.rms_norm(x, weight, 1e-5), torch_ops.rms_norm(x, weight, 1e-5))
    assert dispatch._ops_for(x) is cpu_ops


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (8, 1, 128), (12, 2, 64)]
)
def test_decode_attention_matches_torch(
    cache_dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequences of 1, 16, 17 and 70 tokens (one block, a full block, one past it, several), read through
    shuffled block ids of a random cache."""
    from tests.engine.conftest import PagedBatchBuilder

    torch.manual_seed(head_dim)
    builder = PagedBatchBuilder(num_blocks=32, block_size=16, seed=1)
    lengths = {0: 1, 1: 16, 2: 17, 3: 70}
    builder.step({s: n - 1 for s, n in lengths.items() if n > 1})  # their contexts, cached before
    meta, _ = builder.step({s: 1 for s in lengths})  # then one decode step for all four
    cache = torch.randn(2, 32, 16, kv_heads, head_dim).to(cache_dtype)
    q = torch.randn(len(lengths), q_heads, head_dim)
    calls = []
    kernel = cpu_quant.paged_attention
    monkeypatch.setattr(cpu_quant, "paged_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    got = cpu_ops.paged_attention(q, cache, meta, head_dim**-0.5)
    assert calls == [1]  # the C kernel ran
    ref = torch_ops.paged_attention(q, cache, meta, head_dim**-0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 1, 128), (4, 4, 32), (6, 2, 48)]
)
def test_prompt_chunks_and_decodes_in_one_step_match_torch(
    cache_dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mixed step: a whole 37-token prompt, a 20-token chunk continuing 30 cached tokens, two decodes
    (the kernel takes the prompts in runs of up to 16 tokens); then padding rows past the real tokens,
    which come out as zeros. Head sizes: the kernel's specialized 4 and 8 vectors a row, and others."""
    from tests.engine.conftest import PagedBatchBuilder

    torch.manual_seed(5)
    builder = PagedBatchBuilder(num_blocks=32, block_size=16, seed=4)
    builder.step({1: 30, 2: 9, 3: 50})  # cached context of sequences 1-3
    meta, _ = builder.step({0: 37, 1: 20, 2: 1, 3: 1})
    cache = torch.randn(2, 32, 16, kv_heads, head_dim).to(cache_dtype)
    q = torch.randn(59, q_heads, head_dim)
    calls = []
    kernel = cpu_quant.paged_attention
    monkeypatch.setattr(cpu_quant, "paged_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    got = cpu_ops.paged_attention(q, cache, meta, 0.125)
    assert calls == [1]
    torch.testing.assert_close(got, torch_ops.paged_attention(q, cache, meta, 0.125), rtol=1e-5, atol=1e-5)
    padded = torch.cat([q, torch.randn(5, q_heads, head_dim)])
    got = cpu_ops.paged_attention(padded, cache, meta, 0.125)
    torch.testing.assert_close(
        got, torch_ops.paged_attention(padded, cache, meta, 0.125), rtol=1e-5, atol=1e-5
    )
    assert not got[59:].any()


@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_prompt_tokens_attention_is_the_same_bits_in_a_run_or_alone(head_dim: int) -> None:
    """The kernel reads K and V once per run of consecutive prompt tokens, but each query's arithmetic is
    its own: a token gives the same bits whether its prompt is attended in runs, alone, or chunked
    differently (so chunked prefill and prefix caching change no result)."""
    torch.manual_seed(head_dim)
    kv_heads, q_heads, n = 2, 6, 40
    cache = torch.randn(2, 8, 16, kv_heads, head_dim).half()
    block_table = torch.tensor([[5, 2, 7]], dtype=torch.int32)
    q = torch.randn(n, q_heads, head_dim)
    lens = torch.arange(1, n + 1, dtype=torch.int32)
    whole = cpu_quant.paged_attention(q, cache, block_table, lens, 0.1, torch.zeros(n, dtype=torch.int32))
    for t in (0, 15, 16, 17, 39):  # runs break at 16 tokens
        alone = cpu_quant.paged_attention(q[t : t + 1].contiguous(), cache, block_table, lens[t : t + 1], 0.1)
        assert torch.equal(alone[0], whole[t]), t
    tail = cpu_quant.paged_attention(
        q[23:].contiguous(), cache, block_table, lens[23:], 0.1, torch.zeros(n - 23, dtype=torch.int32)
    )
    assert torch.equal(tail, whole[23:])


@pytest.mark.parametrize("tokens", [1, 7, 100])  # 100: split across threads
def test_silu_and_mul_matches_torch(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(tokens)
    x = torch.randn(tokens, 2 * 1536) * 8  # gate values far into both tails of the sigmoid
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    calls = []
    kernel = cpu_quant.silu_and_mul
    monkeypatch.setattr(cpu_quant, "silu_and_mul", lambda *a: calls.append(1) or kernel(*a))
    got = cpu_ops.silu_and_mul(x)
    assert calls == [1]
    torch.testing.assert_close(got, torch_ops.silu_and_mul(x), rtol=1e-6, atol=1e-6)
    odd = torch.randn(3, 2 * 20)  # not whole vectors: torch's path
    assert torch.equal(cpu_ops.silu_and_mul(odd), torch_ops.silu_and_mul(odd))


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_kv_cache_write_matches_torch_exactly(
    cache_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    tokens, q_heads, kv_heads, head_dim = 5, 9, 3, 64
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim) * 300  # float16 rounding and overflow
    _, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.reshape(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)  # v: strided tokens
    k[0, 0, 0] = 70000.0  # past float16's range: inf, as torch's cast gives
    slots = torch.tensor([17, 3, 40, 41, 0])
    got = torch.zeros(2, 4, 16, kv_heads, head_dim, dtype=cache_dtype)
    ref = got.clone()
    calls = []
    kernel = cpu_quant.write_kv
    monkeypatch.setattr(cpu_quant, "write_kv", lambda *a: calls.append(1) or kernel(*a))
    cpu_ops.write_kv_cache(k, v, got, slots)
    assert calls == [1]
    torch_ops.write_kv_cache(k, v, ref, slots)
    assert torch.equal(got, ref)
