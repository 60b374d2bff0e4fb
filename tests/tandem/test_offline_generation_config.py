"""Offline LLM: without sampling_params, generate/chat use the model's generation_config.json defaults, as
vLLM's LLM does (get_default_sampling_params); explicit SamplingParams are used as given."""

from __future__ import annotations

import json

import pytest

from tandem import LLM, SamplingParams
from tests.engine.conftest import build_tiny_hf_model, write_tokenizer_files


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    folder = tmp_path_factory.mktemp("tiny-generation-config")
    build_tiny_hf_model("llama").save_pretrained(folder)
    write_tokenizer_files(folder)
    config = {"temperature": 0.0, "max_new_tokens": 5, "top_k": 50}  # top_k 50: transformers' own default
    (folder / "generation_config.json").write_text(json.dumps(config))
    return LLM(str(folder), kv_cache_memory=8 * 2**20)


def test_defaults_come_from_the_generation_config(llm: LLM) -> None:
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens, defaults.top_k) == (0.0, 5, None)
    prompt = "The quick brown fox"
    first, second = llm.generate([prompt, prompt], use_tqdm=False)
    # Greedy (temperature 0 from the file) and at most 5 tokens (its max_new_tokens; EOS may come first).
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert len(first.outputs[0].token_ids) <= 5
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == first.outputs[0].token_ids
    chat = llm.chat([{"role": "user", "content": prompt}], use_tqdm=False)[0]
    assert 1 <= len(chat.outputs[0].token_ids) <= 5


def test_explicit_sampling_params_are_used_as_given(llm: LLM) -> None:
    out = llm.generate("Numbers like", SamplingParams(max_tokens=9, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 9
