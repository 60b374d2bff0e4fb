"""Prompt-embedding decoding in the API process, without a server: the flag, the frame bytes and spans."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys

import pytest
import torch

from frontend.errors import APIError
from frontend.serving.model_context import ModelContext
from frontend.serving.prompt_embeds import prompt_with_embeds, prompts_from_embeds
from protocol.messages import Ready
from tests.server_process import REPO

HIDDEN = 8


def _ctx(*, enabled: bool, dtype: str = "float32", max_model_len: int = 64) -> ModelContext:
    ready = Ready(
        engine_id="e",
        served_model_names=["m"],
        max_model_len=max_model_len,
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


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [
        (torch.zeros(3, HIDDEN, requires_grad=True), "grad"),
        (torch.nn.Parameter(torch.zeros(3, HIDDEN)), "plain tensor"),
        (torch.zeros(3, HIDDEN, dtype=torch.float8_e5m2), "dtype"),
        (torch.zeros(65, HIDDEN), "context"),  # _ctx's max_model_len is 64
        (torch.full((2, HIDDEN), 1e300, dtype=torch.float64), "infinite"),  # inf only once cast
    ],
)
def test_tensors_that_cannot_be_sent_are_400(tensor: torch.Tensor, reason: str) -> None:
    with pytest.raises(APIError, match=reason) as info:
        prompts_from_embeds(_ctx(enabled=True), _b64(tensor))
    assert info.value.status == 400 and info.value.param == "prompt_embeds"


def test_limit_counts_the_decoded_rows_in_the_model_dtype() -> None:
    # 1,000 float16 rows are ~17 KB on the wire but 32,000 bytes once cast to float32.
    ctx = _ctx(enabled=True, max_model_len=4096)
    data = _b64(torch.zeros(1000, HIDDEN, dtype=torch.float16))
    with pytest.raises(APIError, match="once decoded"):
        prompts_from_embeds(ctx, data, max_bytes=30_000)
    assert len(prompts_from_embeds(ctx, data, max_bytes=32_000)[0].buffers[0]) == 32_000


_EXPANDED_VIEW = """
import base64, io, resource, torch
from frontend.serving.model_context import ModelContext
from frontend.serving.prompt_embeds import prompts_from_embeds
from frontend.errors import APIError
from protocol.messages import Ready
ready = Ready(engine_id="e", served_model_names=["m"], max_model_len=1_000_000, vocab_size=100,
    num_kv_blocks=8, block_size=16, tokenizer_json="", chat_template=None, bos_token=None, eos_token=None,
    eos_token_ids=[], add_bos_token=False, hidden_size=576, enable_prompt_embeds=True, model_dtype="float32")
ctx = ModelContext(ready, tokenizer=None, chat_template=None, served_model_names=["m"])
buf = io.BytesIO()
torch.save(torch.zeros(1, 576).expand(200_000, 576), buf)
data = base64.b64encode(buf.getvalue()).decode()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    prompts_from_embeds(ctx, data)
    print("accepted")
except APIError as err:
    print(err.status, len(data), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_an_expanded_view_is_refused_without_materializing_it() -> None:
    """200,000 rows of 576 floats (460 MB) saved as a 4 KB view: the byte limit refuses it from the
    shape alone, so the process's peak memory does not grow (a fresh process, so the peak is its own)."""
    result = subprocess.run(
        [sys.executable, "-c", _EXPANDED_VIEW], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    status, payload_chars, peak_growth_kb = map(int, result.stdout.split())
    assert status == 400 and payload_chars < 8_000
    assert peak_growth_kb < 50_000, f"peak RSS grew by {peak_growth_kb} KB"
