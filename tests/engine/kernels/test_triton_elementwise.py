"""Triton RMSNorm, fused add + RMSNorm, SiLU-and-mul, rotary and KV-cache write against float64 references."""

import math

import pytest
import torch

from engine.kernels import triton_ops
from tests.engine.kernels import reference
from tests.engine.kernels.reference import rel_error

HEAD_DIMS = [64, 80, 96, 128]


def _randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


@pytest.mark.parametrize("hidden_size", [64, 200])
def test_rms_norm(device: str, hidden_size: int) -> None:
    seed = 100 + hidden_size
    x = _randn(seed, 5, hidden_size, device=device)
    weight = _randn(seed + 1, hidden_size, device=device)
    out = triton_ops.rms_norm(x, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_error(out.cpu(), reference.rms_norm(x.cpu(), weight.cpu(), 1e-5)) < 1e-5, f"seed={seed}"


def test_rms_norm_strided_rows(device: str) -> None:
    # A column slice of a wider tensor: rows are strided, the last dim is contiguous.
    seed = 7
    wide = _randn(seed, 4, 160, device=device)
    x = wide[:, :96]
    weight = _randn(seed + 1, 96, device=device)
    out = triton_ops.rms_norm(x, weight, 1e-6)
    assert rel_error(out.cpu(), reference.rms_norm(x.cpu(), weight.cpu(), 1e-6)) < 1e-5, f"seed={seed}"


def test_fused_add_rms_norm(device: str) -> None:
    seed = 11
    x = _randn(seed, 6, 96, device=device)
    residual = _randn(seed + 1, 6, 96, device=device)
    weight = _randn(seed + 2, 96, device=device)
    x_before, residual_before = x.clone(), residual.clone()
    out, summed = triton_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_summed = reference.fused_add_rms_norm(x.cpu(), residual.cpu(), weight.cpu(), 1e-5)
    assert rel_error(out.cpu(), ref_out) < 1e-5, f"seed={seed}"
    assert rel_error(summed.cpu(), ref_summed) < 1e-6, f"seed={seed}"
    # Inputs are left untouched.
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_rms_norm_bf16(device: str) -> None:
    seed = 13
    x = _randn(seed, 4, 128, dtype=torch.bfloat16, device=device)
    residual = _randn(seed + 1, 4, 128, dtype=torch.bfloat16, device=device)
    weight = _randn(seed + 2, 128, dtype=torch.bfloat16, device=device)
    out, summed = triton_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert out.dtype == torch.bfloat16 and summed.dtype == torch.bfloat16
    ref_out, ref_summed = reference.fused_add_rms_norm(x.cpu(), residual.cpu(), weight.cpu(), 1e-5)
    assert rel_error(out.cpu(), ref_out) < 2e-2, f"seed={seed}"
    assert rel_error(summed.cpu(), ref_summed) < 2e-2, f"seed={seed}"


@pytest.mark.parametrize("intermediate_size", [64, 1500])
def test_silu_and_mul(device: str, intermediate_size: int) -> None:
    seed = 17 + intermediate_size
    x = _randn(seed, 3, 2 * intermediate_size, device=device) * 3
    out = triton_ops.silu_and_mul(x)
    assert out.shape == (3, intermediate_size)
    assert rel_error(out.cpu(), reference.silu_and_mul(x.cpu())) < 1e-5, f"seed={seed}"


def test_silu_and_mul_bf16(device: str) -> None:
    seed = 19
    x = _randn(seed, 3, 2 * 96, dtype=torch.bfloat16, device=device)
    out = triton_ops.silu_and_mul(x)
    assert out.dtype == torch.bfloat16
    assert rel_error(out.cpu(), reference.silu_and_mul(x.cpu())) < 2e-2, f"seed={seed}"


def _inv_freq(rot_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)


def _llama3_inv_freq(rot_dim: int, theta: float) -> torch.Tensor:
    # Llama 3.1 frequency scaling (factor 8, low/high frequency factors 1 and 4, original context 8192):
    # long wavelengths are divided by the factor, short ones kept, the band between interpolated.
    factor, low_freq_factor, high_freq_factor, original_context = 8.0, 1.0, 4.0, 8192
    inv_freq = _inv_freq(rot_dim, theta)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, interpolated, scaled)


def _cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()  # [max_position, rot_dim]


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_size", HEAD_DIMS)
def test_rotary_embedding(device: str, head_size: int, is_neox: bool) -> None:
    seed = 23 + head_size
    positions = torch.tensor([0, 1, 7, 300, 2047], device=device)
    cache = _cos_sin_cache(_inv_freq(head_size, 10000.0), 2048).to(device)
    q = _randn(seed, 5, 4, head_size, device=device)
    k = _randn(seed + 1, 5, 2, head_size, device=device)
    q_out, k_out = triton_ops.rotary_embedding(positions, q, k, cache, is_neox)
    ref_q, ref_k = reference.rotary_embedding(positions.cpu(), q.cpu(), k.cpu(), cache.cpu(), is_neox)
    assert rel_error(q_out.cpu(), ref_q) < 1e-5, f"seed={seed}"
    assert rel_error(k_out.cpu(), ref_k) < 1e-5, f"seed={seed}"


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_partial_rot_dim_strided(device: str, is_neox: bool) -> None:
    # rot_dim < head_size (only the first dims rotate), and q/k are strided views into one fused qkv tensor.
    seed = 29
    head_size, rot_dim = 80, 32
    qkv = _randn(seed, 4, (3 + 1 + 1) * head_size, device=device)
    q = qkv[:, : 3 * head_size].view(4, 3, head_size)
    k = qkv[:, 3 * head_size : 4 * head_size].view(4, 1, head_size)
    positions = torch.tensor([5, 6, 7, 100], device=device)
    cache = _cos_sin_cache(_inv_freq(rot_dim, 10000.0), 128).to(device)
    q_out, k_out = triton_ops.rotary_embedding(positions, q, k, cache, is_neox)
    ref_q, ref_k = reference.rotary_embedding(positions.cpu(), q.cpu(), k.cpu(), cache.cpu(), is_neox)
    assert rel_error(q_out.cpu(), ref_q) < 1e-5, f"seed={seed}"
    assert rel_error(k_out.cpu(), ref_k) < 1e-5, f"seed={seed}"
    assert torch.equal(q_out[..., rot_dim:].cpu(), q[..., rot_dim:].cpu())


def test_rotary_llama3_scaled_cache(device: str) -> None:
    seed = 31
    head_size = 128
    inv_freq = _llama3_inv_freq(head_size, 500000.0)
    assert not torch.allclose(
        inv_freq, _inv_freq(head_size, 500000.0)
    )  # the scaling really changes something
    cache = _cos_sin_cache(inv_freq, 10000).to(device)
    positions = torch.tensor([3, 4096, 8191, 9999], device=device)
    q = _randn(seed, 4, 4, head_size, device=device)
    k = _randn(seed + 1, 4, 1, head_size, device=device)
    q_out, k_out = triton_ops.rotary_embedding(positions, q, k, cache, True)
    ref_q, ref_k = reference.rotary_embedding(positions.cpu(), q.cpu(), k.cpu(), cache.cpu(), True)
    assert rel_error(q_out.cpu(), ref_q) < 1e-5, f"seed={seed}"
    assert rel_error(k_out.cpu(), ref_k) < 1e-5, f"seed={seed}"


def test_rotary_bf16(device: str) -> None:
    seed = 37
    cache = _cos_sin_cache(_inv_freq(64, 10000.0), 64).to(device)
    positions = torch.tensor([0, 9, 63], device=device)
    q = _randn(seed, 3, 4, 64, dtype=torch.bfloat16, device=device)
    k = _randn(seed + 1, 3, 2, 64, dtype=torch.bfloat16, device=device)
    q_out, k_out = triton_ops.rotary_embedding(positions, q, k, cache, False)
    assert q_out.dtype == torch.bfloat16
    ref_q, ref_k = reference.rotary_embedding(positions.cpu(), q.cpu(), k.cpu(), cache.cpu(), False)
    assert rel_error(q_out.cpu(), ref_q) < 2e-2, f"seed={seed}"
    assert rel_error(k_out.cpu(), ref_k) < 2e-2, f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_size", [80, 128])
def test_write_kv_cache(device: str, head_size: int, dtype: torch.dtype) -> None:
    seed = 41 + head_size
    num_blocks, block_size, num_kv_heads = 6, 16, 2
    kv_cache = _randn(seed, 2, num_blocks, block_size, num_kv_heads, head_size, dtype=dtype, device=device)
    k = _randn(seed + 1, 5, num_kv_heads, head_size, dtype=dtype, device=device)
    v = _randn(seed + 2, 5, num_kv_heads, head_size, dtype=dtype, device=device)
    # Non-contiguous blocks, offsets anywhere inside a block.
    slot_mapping = torch.tensor([4 * 16 + 3, 4 * 16 + 4, 1 * 16 + 15, 5 * 16 + 0, 0 * 16 + 9], device=device)
    expected = reference.write_kv_cache(k.cpu(), v.cpu(), kv_cache.cpu(), slot_mapping.cpu())
    triton_ops.write_kv_cache(k, v, kv_cache, slot_mapping)
    assert torch.equal(kv_cache.cpu(), expected), f"seed={seed}"


def test_write_kv_cache_skips_padding_slots(device: str) -> None:
    # CUDA-graph padding tokens carry a negative slot and must leave the cache alone.
    seed = 43
    kv_cache = _randn(seed, 2, 2, 16, 1, 64, device=device)
    before = kv_cache.clone()
    k = _randn(seed + 1, 2, 1, 64, device=device)
    v = _randn(seed + 2, 2, 1, 64, device=device)
    triton_ops.write_kv_cache(k, v, kv_cache, torch.tensor([17, -1], device=device))
    assert torch.equal(kv_cache[:, 1, 1], torch.stack([k[0], v[0]]))
    kv_cache[:, 1, 1] = before[:, 1, 1]
    assert torch.equal(kv_cache, before)
