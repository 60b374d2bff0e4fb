"""The offline `LLM` API: same answers as the server, order, stop strings, n, logprobs, chat and errors."""

from __future__ import annotations

import httpx
import pytest

from tandem import LLM, SamplingParams
from tandem.offline import engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
SUBJECTS = ["cats", "the sea", "winter", "a robot", "coffee", "Paris", "music", "rain", "trains", "the moon"]
STARTS = ["Tell me about", "A poem on", "Facts on", "Why I like", "The history of"]
PROMPTS_100 = [
    f"{start} {subject} ({i})"
    for i, (start, subject) in enumerate((s, t) for s in STARTS for t in SUBJECTS for _ in range(2))
]


def test_hundred_prompts_match_the_server_in_order(default_server, offline_llm: LLM) -> None:
    assert len(set(PROMPTS_100)) == 100
    resp = httpx.post(
        f"{default_server.base_url}/v1/completions",
        json={"prompt": PROMPTS_100, "max_tokens": 8, "temperature": 0},
        timeout=600,
    )
    assert resp.status_code == 200, resp.text
    server = sorted(resp.json()["choices"], key=lambda c: c["index"])
    outputs = offline_llm.generate(PROMPTS_100, GREEDY, use_tqdm=False)
    assert len(outputs) == 100
    assert [o.prompt for o in outputs] == PROMPTS_100
    assert [int(o.request_id) for o in outputs] == sorted(int(o.request_id) for o in outputs)
    mismatches = [
        (p, c["text"], o.outputs[0].text)
        for p, c, o in zip(PROMPTS_100, server, outputs, strict=True)
        if c["text"] != o.outputs[0].text or c["finish_reason"] != o.outputs[0].finish_reason
    ]
    assert not mismatches, mismatches[:5]
    assert all(o.finished and len(o.outputs[0].token_ids) <= 8 for o in outputs)


def test_token_prompts_equal_text_prompts(offline_llm: LLM) -> None:
    text = "The capital of France is"
    ids = offline_llm.get_tokenizer().encode(text, add_special_tokens=False).ids
    by_text, by_ids, by_id_lists = (
        offline_llm.generate(text, GREEDY, use_tqdm=False)[0],
        offline_llm.generate(ids, GREEDY, use_tqdm=False)[0],
        offline_llm.generate([ids, ids], GREEDY, use_tqdm=False),
    )
    assert by_ids.prompt_token_ids == by_text.prompt_token_ids == ids
    assert by_ids.prompt is None
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids
    assert [o.outputs[0].text for o in by_id_lists] == [by_text.outputs[0].text] * 2
    # The repeated prompt found the earlier runs' KV: all but its last token, copied from the partial block
    # where they ended (prefix caching).
    assert max(o.num_cached_tokens for o in by_id_lists) == len(ids) - 1


def test_stop_string_ends_early_and_frees_the_engine(offline_llm: LLM) -> None:
    free = offline_llm.generate(
        "Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False
    )
    full_text = free[0].outputs[0].text
    assert "," in full_text, full_text  # the model continues the list
    stop_at = full_text.index(",")
    steps_before = offline_llm.stepper.step_count
    out = offline_llm.generate(
        "Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=24, stop=","), use_tqdm=False
    )[0].outputs[0]
    assert out.text == full_text[:stop_at]
    assert (out.finish_reason, out.stop_reason) == ("stop", ",")
    # The match aborted the engine request: it stopped stepping long before max_tokens.
    assert offline_llm.stepper.step_count - steps_before == len(out.token_ids) < 24
    assert not offline_llm.stepper.has_work and offline_llm.stepper.owner == {}


def test_n_seeded_samples_are_reproducible(offline_llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6)
    first = offline_llm.generate("Once upon a time", params, use_tqdm=False)[0]
    again = offline_llm.generate("Once upon a time", params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]


def test_logprobs_are_per_position_with_top_k(offline_llm: LLM) -> None:
    out = offline_llm.generate(
        "Hello", SamplingParams(temperature=0.0, max_tokens=4, logprobs=3), use_tqdm=False
    )
    choice = out[0].outputs[0]
    assert choice.logprobs is not None and len(choice.logprobs) == len(choice.token_ids)
    for token_id, position in zip(choice.token_ids, choice.logprobs, strict=True):
        assert token_id in position
        assert position[token_id].rank == 1  # greedy: the sampled token is the most likely one
        assert len(position) == 3
        assert max(lp.logprob for lp in position.values()) == position[token_id].logprob
    assert choice.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for t, p in zip(choice.token_ids, choice.logprobs, strict=True))
    )


def test_chat_uses_the_chat_template(offline_llm: LLM) -> None:
    conversation = [{"role": "user", "content": "Say hi"}]
    [one] = offline_llm.chat(conversation, GREEDY, use_tqdm=False)
    assert one.prompt is not None and one.prompt.startswith("<|im_start|>")
    assert one.prompt.endswith("<|im_start|>assistant\n")
    two = offline_llm.chat([conversation, conversation], GREEDY, use_tqdm=False)
    assert [o.outputs[0].text for o in two] == [one.outputs[0].text] * 2


def test_progress_bar_shows_only_when_asked(offline_llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    offline_llm.generate("Hi", SamplingParams(max_tokens=1), use_tqdm=False)
    assert capsys.readouterr().err == ""
    offline_llm.generate(["Hi", "Yo"], SamplingParams(max_tokens=1), use_tqdm=True)
    assert "2/2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(temperature=3.0), "temperature"),
        (SamplingParams(max_tokens=10**6), "maximum context length"),
        (SamplingParams(stop=[""]), "stop"),
        (SamplingParams(regex="a+", choice=["x"]), "at most one"),
        (SamplingParams(logit_bias={10**7: 1.0}), "logit_bias"),
    ],
)
def test_bad_settings_raise_value_error(offline_llm: LLM, params: SamplingParams, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        offline_llm.generate("Hi", params, use_tqdm=False)
    assert not offline_llm.stepper.has_work


def test_bad_prompts_and_options(offline_llm: LLM) -> None:
    with pytest.raises(ValueError, match="token ids"):
        offline_llm.generate([[1, 2], "x", []], use_tqdm=False)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="vocabulary"):
        offline_llm.generate([10**7], use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        offline_llm.generate("x", [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="task='embed'"):
        offline_llm.embed("x")
    with pytest.raises(TypeError, match="unknown engine option.*max_num_seq\\b"):
        engine_config(None, {"max_num_seq": 4})
    assert engine_config(None, {"kv_cache_memory": "64M"}).kv_cache_memory == 64 * 2**20


def test_embed_with_the_default_embedding_model() -> None:
    import numpy as np

    llm = LLM(task="embed")
    texts = [
        "A cat sits on the mat.",
        "A cat is sitting on a mat.",
        "Stock prices fell sharply.",
        "A cat sits on the mat.",
    ]
    outputs = llm.embed(texts, use_tqdm=False)
    assert [o.prompt for o in outputs] == texts
    assert outputs[0].prompt_token_ids[0] == 101 and outputs[0].prompt_token_ids[-1] == 102  # [CLS] ... [SEP]
    vectors = np.array([o.embedding for o in outputs])
    assert vectors.shape == (4, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.9 > 0.3 > similarity[0, 2]
    assert np.allclose(vectors[0], vectors[3], atol=1e-6)
    with pytest.raises(ValueError, match="embedding model"):
        llm.generate("hi", use_tqdm=False)
