"""Response shapes on hand-made logprob entries: vLLM's orders and `token_id:N` names, chat echo."""

from __future__ import annotations

import json

from frontend.schemas import decode_chat_request
from frontend.serving.chat import echo_prefix
from frontend.serving.output import LogprobEntry
from frontend.serving.responses import chat_logprobs, completion_logprobs, generate_logprobs

# The sampled token (id 7, " b") is the second most likely; the top 2 are " a" (5) and " b" (7).
SAMPLED_SECOND = LogprobEntry(
    " b", -1.2, [32, 98], [(" a", -0.5, [32, 97]), (" b", -1.2, [32, 98])], 7, 2, [5, 7]
)
# The sampled token (id 9, " c") is outside the top 2.
SAMPLED_OUTSIDE = LogprobEntry(
    " c", -3.0, [32, 99], [(" a", -0.5, [32, 97]), (" b", -1.2, [32, 98])], 9, 3, [5, 7]
)


def test_completion_top_logprobs_start_with_the_sampled_token() -> None:
    lp = completion_logprobs([SAMPLED_SECOND, SAMPLED_OUTSIDE], 4)
    assert [list(top) for top in lp["top_logprobs"]] == [[" b", " a"], [" c", " a", " b"]]
    assert lp["text_offset"] == [4, 6]
    as_ids = completion_logprobs([SAMPLED_OUTSIDE], 0, as_ids=True)
    assert as_ids["tokens"] == ["token_id:9"]
    assert as_ids["top_logprobs"] == [{"token_id:9": -3.0, "token_id:5": -0.5, "token_id:7": -1.2}]


def test_chat_logprobs_as_token_ids_keep_the_real_bytes() -> None:
    (entry,) = chat_logprobs([SAMPLED_SECOND], as_ids=True)["content"]
    assert (entry["token"], entry["bytes"]) == ("token_id:7", [32, 98])
    assert [t["token"] for t in entry["top_logprobs"]] == ["token_id:5", "token_id:7"]
    (plain,) = chat_logprobs([SAMPLED_SECOND])["content"]
    assert [t["token"] for t in plain["top_logprobs"]] == [" a", " b"]  # chat keeps the rank order


def test_generate_logprobs_hold_the_sampled_token_first_even_for_zero() -> None:
    (zero,) = generate_logprobs([SAMPLED_OUTSIDE], 0)["content"]
    assert zero["top_logprobs"] == [{"token": "token_id:9", "logprob": -3.0, "bytes": None}]
    (two,) = generate_logprobs([SAMPLED_SECOND], 2)["content"]
    assert [t["token"] for t in two["top_logprobs"]] == ["token_id:7", "token_id:5"]
    assert two["bytes"] is None


def _chat(**fields: object) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def test_chat_echo_repeats_a_last_message_of_the_answers_role() -> None:
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, my"}]
    continued = decode_chat_request(_chat(messages=prefill, echo=True, continue_final_message=True))
    assert echo_prefix(continued) == "Hello, my"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert echo_prefix(decode_chat_request(_chat(messages=parts, echo=True))) == "a\nb"
    user_last = decode_chat_request(_chat(messages=prefill[:1], echo=True))
    assert echo_prefix(user_last) == ""  # the answer is the assistant's; the user's turn is not repeated
    no_prompt = decode_chat_request(_chat(messages=prefill[:1], echo=True, add_generation_prompt=False))
    assert echo_prefix(no_prompt) == "hi"  # no generation prompt: the answer continues the user's turn
    assert echo_prefix(decode_chat_request(_chat(messages=prefill))) == ""
