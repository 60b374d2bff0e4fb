"""GGUF rope_freqs (Llama 3.1's rope scaling as llama.cpp's converter stores it): folded into the rotary
frequencies, the model matches transformers' llama3 rope scaling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.layers.rotary import build_cos_sin_cache
from engine.loader import LoadedModel, load_model
from tests.engine.conftest import PagedBatchBuilder, build_tiny_hf_model
from tests.engine.tiny_gguf import SpmVocab, llama3_rope_freqs, train_sentencepiece, write_llama_gguf


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    # factor 8, original context 64: of the 8 frequencies, one is kept, two are blended, five slowed.
    return build_tiny_hf_model("llama3_rope")


@pytest.fixture(scope="module")
def vocab() -> SpmVocab:
    return train_sentencepiece(512)


def _logits(loaded: LoadedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    arch = loaded.arch
    builder = PagedBatchBuilder(num_blocks=40, block_size=16, seed=1)
    kv_caches = [torch.zeros(2, 40, 16, arch.num_key_value_heads, arch.head_dim) for _ in range(2)]
    meta, positions = builder.step(dict(enumerate(len(p) for p in prompts)))
    with torch.no_grad():
        hidden = loaded.model(torch.tensor([t for p in prompts for t in p]), positions, kv_caches, meta)
        logits = loaded.model.compute_logits(hidden)
    starts = meta.query_start_loc_cpu
    return [logits[starts[i] : starts[i + 1]] for i in range(len(prompts))]


def test_rope_freqs_match_transformers_llama3_scaling(
    hf_model: torch.nn.Module, vocab: SpmVocab, tmp_path: Path
) -> None:
    rope_freqs = llama3_rope_freqs(hf_model.config)
    assert sorted(set(rope_freqs.tolist()))[0] == 1.0 and rope_freqs.max() == 8.0
    path = write_llama_gguf(tmp_path / "llama31-tiny.gguf", hf_model, vocab, rope_freqs=rope_freqs)
    loaded = load_model(str(path), dtype="float32")
    assert loaded.arch.rope_scaling == {"rope_type": "default", "freq_factors": tuple(rope_freqs.tolist())}

    # Positions far past the original 64, where the scaling matters.
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=generator).tolist() for n in (200, 37)]
    got = _logits(loaded, prompts)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            expected = hf_model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=1e-4, msg=f"seq={i}")

    # Without rope_freqs the same weights give logits over 10x the tolerance away: the check above can fail.
    plain = write_llama_gguf(tmp_path / "no-rope-freqs.gguf", hf_model, vocab)
    unscaled = _logits(load_model(str(plain), dtype="float32"), prompts[:1])[0]
    assert (unscaled - got[0]).abs().max() > 1e-3


def test_freq_factors_divide_each_frequency() -> None:
    factors = (1.0, 2.0, 4.0, 8.0)
    plain = build_cos_sin_cache(8, 32, 10000.0, None)
    scaled = build_cos_sin_cache(8, 32, 10000.0, {"rope_type": "default", "freq_factors": factors})
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    angles = torch.outer(torch.arange(32).float(), inv_freq / torch.tensor(factors))
    torch.testing.assert_close(scaled, torch.cat((angles.cos(), angles.sin()), dim=-1))
    assert not torch.allclose(plain, scaled)
    with pytest.raises(ValueError, match="freq_factors must hold 4 values"):
        build_cos_sin_cache(8, 32, 10000.0, {"rope_type": "default", "freq_factors": (1.0, 2.0)})
