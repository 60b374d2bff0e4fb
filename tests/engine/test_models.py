"""Tandem's models against `transformers` on tiny random checkpoints: prefill, paged decode, greedy runs."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engine.loader import load_model
from engine.models.config import ModelArchConfig
from tests.engine.conftest import TINY_VARIANTS, PagedBatchBuilder, TinyModelDir, build_tiny_hf_model

BLOCK_SIZE = 4
NUM_BLOCKS = 64


class PagedRunner:
    """Drives a Tandem model step by step over a paged KV cache, like the model runner does."""

    def __init__(self, model: torch.nn.Module, arch: ModelArchConfig, seed: int) -> None:
        self.model = model
        self.builder = PagedBatchBuilder(NUM_BLOCKS, BLOCK_SIZE, seed)
        shape = (2, NUM_BLOCKS, BLOCK_SIZE, arch.num_key_value_heads, arch.head_dim)
        self.kv_caches = [torch.zeros(shape) for _ in range(arch.num_hidden_layers)]

    @torch.no_grad()
    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """{seq_id: token ids} -> {seq_id: logits [n, vocab]} for those tokens."""
        meta, positions = self.builder.step({s: len(t) for s, t in new_tokens.items()})
        input_ids = torch.tensor([t for tokens in new_tokens.values() for t in tokens])
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden)
        starts = meta.query_start_loc_cpu
        return {s: logits[starts[i] : starts[i + 1]] for i, s in enumerate(new_tokens)}


@pytest.fixture(scope="module")
def hf_models() -> dict[str, torch.nn.Module]:
    return {}


def _hf(variant: str, cache: dict[str, torch.nn.Module]) -> torch.nn.Module:
    if variant not in cache:
        cache[variant] = build_tiny_hf_model(variant)  # same seed as the saved folder
    return cache[variant]


@torch.no_grad()
def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_prefill_and_paged_decode_match_transformers(
    variant: str, tiny_model_dir: TinyModelDir, hf_models: dict[str, torch.nn.Module]
) -> None:
    seed = sum(map(ord, variant))
    rng = random.Random(seed)
    loaded = load_model(str(tiny_model_dir(variant)))
    assert loaded.dtype == torch.float32
    hf = _hf(variant, hf_models)
    runner = PagedRunner(loaded.model, loaded.arch, seed)
    vocab = loaded.arch.vocab_size
    sequences = {s: [rng.randrange(vocab) for _ in range(n)] for s, n in enumerate([5, 11, 1, 8])}

    # Step 1: one batch of prefills with different lengths.
    logits = runner.step(sequences)
    for s, ids in sequences.items():
        torch.testing.assert_close(
            logits[s], _hf_logits(hf, ids), atol=1e-4, rtol=1e-4, msg=f"seed={seed} seq={s}"
        )

    # Steps 2-5: decodes, with sequence 3 continuing its prompt in one chunk (a mixed batch).
    for step in range(4):
        new = {s: [rng.randrange(vocab)] for s in range(3)}
        new[3] = [rng.randrange(vocab) for _ in range(6 if step == 0 else 1)]
        logits = runner.step(new)
        for s, ids in new.items():
            sequences[s] += ids
            expected = _hf_logits(hf, sequences[s])[-len(ids) :]
            torch.testing.assert_close(
                logits[s], expected, atol=1e-4, rtol=1e-4, msg=f"seed={seed} step={step} seq={s}"
            )


@pytest.mark.parametrize("variant", ["llama", "llama3_rope", "qwen2", "qwen3"])
def test_greedy_batch_matches_transformers_generate(
    variant: str, tiny_model_dir: TinyModelDir, hf_models: dict[str, torch.nn.Module]
) -> None:
    seed = 7 + len(variant)
    rng = random.Random(seed)
    loaded = load_model(str(tiny_model_dir(variant)))
    hf = _hf(variant, hf_models)
    prompts = {s: [rng.randrange(loaded.arch.vocab_size) for _ in range(n)] for s, n in enumerate([6, 3, 9])}
    num_steps = 32

    runner = PagedRunner(loaded.model, loaded.arch, seed)
    generated: dict[int, list[int]] = {s: [] for s in prompts}
    logits = runner.step(prompts)
    for _ in range(num_steps):
        next_ids = {s: [int(logits[s][-1].argmax())] for s in prompts}
        for s, ids in next_ids.items():
            generated[s] += ids
        logits = runner.step(next_ids)

    for s, prompt in prompts.items():
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=num_steps,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert generated[s] == out[0, len(prompt) :].tolist(), f"seed={seed} seq={s}"


def test_inputs_embeds_replace_lookup(tiny_model_dir: TinyModelDir) -> None:
    loaded = load_model(str(tiny_model_dir("qwen3")))
    ids = [3, 17, 250, 9]
    by_ids = PagedRunner(loaded.model, loaded.arch, 1)
    by_embeds = PagedRunner(loaded.model, loaded.arch, 1)
    meta, positions = by_embeds.builder.step({0: len(ids)})
    embeds = loaded.model.embed_input_ids(torch.tensor(ids))
    assert embeds.shape == (4, loaded.arch.hidden_size)
    with torch.no_grad():
        hidden = loaded.model(torch.zeros(4, dtype=torch.int64), positions, by_embeds.kv_caches, meta, embeds)
    logits = by_ids.step({0: ids})[0]
    torch.testing.assert_close(loaded.model.compute_logits(hidden), logits)
    assert logits.dtype == torch.float32


def test_tied_and_untied_heads(tiny_model_dir: TinyModelDir) -> None:
    tied = load_model(str(tiny_model_dir("qwen2"))).model
    untied = load_model(str(tiny_model_dir("llama"))).model
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["llama3_rope", "qwen3"])
def test_cuda_triton_path_matches_cpu(variant: str, tiny_model_dir: TinyModelDir) -> None:
    """The same model through dispatch's Triton kernels on CUDA and the torch ops on CPU."""
    folder = str(tiny_model_dir(variant))
    cpu = load_model(folder, dtype="float32")
    gpu = load_model(folder, dtype="float32", device="cuda")
    builder = PagedBatchBuilder(NUM_BLOCKS, BLOCK_SIZE, seed=11)
    arch = cpu.arch
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, arch.num_key_value_heads, arch.head_dim)
    caches = {
        dev: [torch.zeros(shape, device=dev) for _ in range(arch.num_hidden_layers)]
        for dev in ("cpu", "cuda")
    }
    rng = random.Random(11)
    steps = [{0: 9, 1: 1, 2: 5}, {0: 1, 1: 1, 2: 7}, {0: 1, 1: 1, 2: 1}]
    for step in steps:
        meta, positions = builder.step(step)
        input_ids = torch.tensor([rng.randrange(arch.vocab_size) for _ in range(int(positions.shape[0]))])
        cuda_meta = dataclasses.replace(
            meta,
            query_start_loc=meta.query_start_loc.cuda(),
            seq_lens=meta.seq_lens.cuda(),
            block_table=meta.block_table.cuda(),
            slot_mapping=meta.slot_mapping.cuda(),
        )
        with torch.no_grad():
            expected = cpu.model.compute_logits(cpu.model(input_ids, positions, caches["cpu"], meta))
            got = gpu.model.compute_logits(
                gpu.model(input_ids.cuda(), positions.cuda(), caches["cuda"], cuda_meta)
            )
        torch.testing.assert_close(got.cpu(), expected, atol=2e-3, rtol=2e-3, msg=f"step={step}")
