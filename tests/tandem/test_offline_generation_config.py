"""Offline LLM: without sampling_params, generate/chat use the model's generation_config.json defaults, as
vLLM's LLM does (get_default_sampling_params); its max_new_tokens caps every request, as on the server."""

from __future__ import annotations

import json

import pytest

from tandem import LLM, SamplingParams
from tests.engine.conftest import build_tiny_hf_model, write_tokenizer_files


def _llm(tmp_path_factory: pytest.TempPathFactory, max_new_tokens: int) -> LLM:
    folder = tmp_path_factory.mktemp(f"tiny-generation-config-{max_new_tokens}")
    build_tiny_hf_model("llama").save_pretrained(folder)
    write_tokenizer_files(folder)
    # top_k 50 is transformers' own default, which is ignored (as vLLM ignores it).
    config = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "top_k": 50}
    (folder / "generation_config.json").write_text(json.dumps(config))
    return LLM(str(folder), kv_cache_memory=8 * 2**20)  # the tiny model's context: 256 tokens


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return _llm(tmp_path_factory, 6)


def test_defaults_come_from_the_generation_config(llm: LLM) -> None:
    defaults = llm.get_default_sampling_params()
    # max_tokens None: all the room left, which the file's max_new_tokens then caps.
    assert (defaults.temperature, defaults.max_tokens, defaults.top_k) == (0.0, None, None)
    prompt = "The quick brown fox"
    first, second = llm.generate([prompt, prompt], use_tqdm=False)
    # Greedy (temperature 0 from the file), and at most 6 tokens (EOS may come first).
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert 1 <= len(first.outputs[0].token_ids) <= 6
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == first.outputs[0].token_ids
    chat = llm.chat([{"role": "user", "content": prompt}], use_tqdm=False)[0]
    assert 1 <= len(chat.outputs[0].token_ids) <= 6


def test_explicit_sampling_params_are_capped_by_max_new_tokens(llm: LLM) -> None:
    short = llm.generate("Numbers like", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(short.outputs[0].token_ids) == 4
    long = llm.generate("Numbers like", SamplingParams(max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    assert len(long.outputs[0].token_ids) == 6


def test_a_max_new_tokens_beyond_the_context_is_capped_by_the_room(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    roomy = _llm(tmp_path_factory, 400)  # more than the 256-token context holds: a cap, not a request
    params = roomy.get_default_sampling_params()
    params.ignore_eos = True
    out = roomy.generate("Numbers like", params, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 256
