"""The default SmolLM2 GGUF: Tandem's logits and tokenizer against `transformers` reading the same file."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer

from engine.loader import LoadedModel
from tests.engine.conftest import PagedBatchBuilder

TOKENIZER_CASES = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé — “quotes” and ‘apostrophes’",
    "日本語のテキストと中文文本",
    "Emoji: 🚀🔥👍🏽 and flags 🇫🇷",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|><|endoftext|>",
    "Numbers: 3.14159, 1,000,000 and 2024-06-01T12:34:56Z",
    "tabs\tand\nnewlines\r\nmixed\n\n\n",
    "I'm sure they'll say we've done it, hasn't he?",
    "URL https://example.com/path?query=1&x=%20y#frag",
    '{"json": [1, 2, {"nested": null}], "ok": true}',
    "Ελληνικά, русский текст, العربية, עברית",
    "x" * 50,
    "<file_sep><filename>main.py<gh_stars>100",
    "",
    " ",
    "CamelCaseIdentifiers and snake_case_names",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2 ≤ ∞",
]


def test_default_model_metadata(default_loaded_model: LoadedModel) -> None:
    loaded = default_loaded_model
    assert loaded.default_served_name == "SmolLM2-135M-Instruct"
    assert loaded.dtype == torch.float32
    assert (
        loaded.arch.num_hidden_layers,
        loaded.arch.num_attention_heads,
        loaded.arch.num_key_value_heads,
    ) == (30, 9, 3)
    assert loaded.arch.tie_word_embeddings
    info = loaded.tokenizer
    assert info.eos_token == "<|im_end|>" and 2 in info.eos_token_ids
    assert info.bos_token == "<|im_start|>"
    assert not info.add_bos_token
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template


def test_prompt_logits_match_transformers(
    default_loaded_model: LoadedModel, hf_gguf_oracle: tuple[torch.nn.Module, Any]
) -> None:
    hf_model, hf_tokenizer = hf_gguf_oracle
    loaded = default_loaded_model
    prompts = [
        "<|im_start|>user\nWrite a haiku about paged attention.<|im_end|>\n<|im_start|>assistant\n",
        "The capital of France is",
    ]
    ids = {s: hf_tokenizer.encode(p, add_special_tokens=False) for s, p in enumerate(prompts)}
    arch = loaded.arch
    builder = PagedBatchBuilder(num_blocks=16, block_size=16, seed=0)
    kv_caches = [
        torch.zeros(2, 16, 16, arch.num_key_value_heads, arch.head_dim) for _ in range(arch.num_hidden_layers)
    ]
    meta, positions = builder.step({s: len(t) for s, t in ids.items()})
    with torch.no_grad():
        hidden = loaded.model(torch.tensor(ids[0] + ids[1]), positions, kv_caches, meta)
        logits = loaded.model.compute_logits(hidden)
        # Then one decode step for both, batched.
        next_ids = {s: [int(logits[meta.query_start_loc_cpu[s + 1] - 1].argmax())] for s in ids}
        meta2, positions2 = builder.step({s: 1 for s in ids})
        decode_logits = loaded.model.compute_logits(
            loaded.model(torch.tensor([next_ids[0][0], next_ids[1][0]]), positions2, kv_caches, meta2)
        )
        for s in ids:
            expected = hf_model(torch.tensor([ids[s] + next_ids[s]])).logits[0].float()
            start, end = meta.query_start_loc_cpu[s], meta.query_start_loc_cpu[s + 1]
            torch.testing.assert_close(logits[start:end], expected[:-1], atol=1e-3, rtol=1e-3, msg=f"seq={s}")
            torch.testing.assert_close(
                decode_logits[s], expected[-1], atol=1e-3, rtol=1e-3, msg=f"seq={s} decode"
            )


def test_gguf_tokenizer_matches_transformers(
    default_loaded_model: LoadedModel, hf_gguf_oracle: tuple[torch.nn.Module, Any]
) -> None:
    _, hf_tokenizer = hf_gguf_oracle
    ours = Tokenizer.from_str(default_loaded_model.tokenizer.tokenizer_json)
    assert ours.get_vocab_size() == hf_tokenizer.vocab_size == 49152
    for text in TOKENIZER_CASES:
        expected = hf_tokenizer.encode(text, add_special_tokens=False)
        got = ours.encode(text, add_special_tokens=False).ids
        assert got == expected, f"text={text!r}"
        assert ours.decode(got, skip_special_tokens=False) == hf_tokenizer.decode(expected), f"text={text!r}"
        assert ours.decode(got, skip_special_tokens=True) == hf_tokenizer.decode(
            expected, skip_special_tokens=True
        )
    # Chat markup encodes as single special tokens.
    assert ours.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert ours.encode("<|im_end|>", add_special_tokens=False).ids == [2]
