"""Prompt-embedding decoding in the API process, without a server: the flag, the frame bytes and spans."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
import torch

from frontend.errors import APIError
from frontend.serving.model_context import ModelContext
from frontend.serving.prompt_embeds import prompt_with_embeds, prompts_from_embeds
from protocol.messages import Ready

HIDDEN = 8


def _ctx(*, enabled: bool, dtype: str = "float32") -> ModelContext:
    ready = Ready(
        engine_id="e",
        served_model_names=["m"],
        max_model_len=64,
        vocab_size=100,
        num_kv_blocks=8,
        block_size=16,
        tokenizer_json="",
        chat_template=None,
        bos_token=None,
        eos_token=None,
        eos_token_ids=[],
        add_bos_token=False,
        hidden_size=HIDDEN,
        enable_prompt_embeds=enabled,
        model_dtype=dtype,
    )
    return ModelContext(ready, tokenizer=None, chat_template=None, served_model_names=["m"])  # type: ignore[arg-type]


def _b64(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode()


def test_without_the_flag_is_a_400_saying_how_to_enable() -> None:
    with pytest.raises(APIError) as info:
        prompts_from_embeds(_ctx(enabled=False), _b64(torch.zeros(2, HIDDEN)))
    assert info.value.status == 400 and "--enable-prompt-embeds" in info.value.message
    with pytest.raises(APIError):
        prompt_with_embeds(_ctx(enabled=False), "x", [_b64(torch.zeros(2, HIDDEN))])


def test_frames_hold_the_rows_cast_to_the_model_dtype() -> None:
    rows = torch.randn(1, 3, HIDDEN, dtype=torch.float64)  # a leading batch dim of 1 is squeezed
    (prompt,) = prompts_from_embeds(_ctx(enabled=True), _b64(rows))
    (span,) = prompt.embeds
    assert prompt.token_ids == [0, 0, 0]
    assert (span.start, span.num_tokens, span.frame_index, span.dtype) == (0, 3, 0, "float32")
    assert prompt.buffers[0] == rows[0].float().numpy().tobytes()
    assert span.digest == hashlib.blake2b(prompt.buffers[0], digest_size=16).hexdigest()


def test_bfloat16_models_get_raw_16_bit_frames() -> None:
    rows = torch.randn(2, HIDDEN)
    (prompt,) = prompts_from_embeds(_ctx(enabled=True, dtype="bfloat16"), [_b64(rows)])
    assert prompt.embeds[0].dtype == "bfloat16" and prompt.embeds[0].num_tokens == 2
    back = torch.frombuffer(bytearray(prompt.buffers[0]), dtype=torch.bfloat16).view(2, HIDDEN)
    assert torch.equal(back, rows.to(torch.bfloat16))


def test_oversized_payload_is_refused_before_decoding() -> None:
    data = _b64(torch.zeros(4, HIDDEN))
    with pytest.raises(APIError, match="limit"):
        prompts_from_embeds(_ctx(enabled=True), data, max_bytes=16)
