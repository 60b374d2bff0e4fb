"""A LoRA adapter on the default model (SmolLM2 GGUF): made by peft on transformers' reading of the same
file (Hugging Face module names of the Llama layout), Tandem's logprobs under it equal peft's, and a base
request in the same batch equals transformers without it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, RequestDelta, SamplingParams
from tests.engine.lora_adapters import make_peft_adapter, reference_logprobs

TOP = 20
ATOL = 2e-3  # Tandem and transformers read the GGUF to ~7e-5 logits (MACHINE_NOTES); 30 layers in float32


def _check(deltas: list[RequestDelta], reference: torch.Tensor, prompt_len: int) -> None:
    """Each prompt position's and generated token's top logprobs equal the reference at those ids."""
    assert all(d.error is None for d in deltas), deltas[-1].error
    rows = [row for row in deltas[0].prompt_logprobs or [] if row is not None]
    rows += [lp for d in deltas for lp in d.logprobs or []]
    assert len(rows) == prompt_len - 1 + sum(len(d.new_token_ids) for d in deltas)
    for position, row in enumerate(rows):
        expected = reference[position, torch.tensor(row.top_ids)]
        torch.testing.assert_close(torch.tensor(row.top_logprobs), expected, atol=ATOL, rtol=0)


def test_an_adapter_on_the_default_model_matches_peft(
    hf_gguf_oracle: tuple[torch.nn.Module, Any], default_gguf_path: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    hf_model, tokenizer = hf_gguf_oracle
    adapter_dir = make_peft_adapter(hf_model, tmp_path / "smol", seed=21, rank=8, alpha=16, std=0.03)
    config = EngineConfig(
        dtype="float32", enable_lora=True, lora_modules=(("smol", str(adapter_dir), None),), max_lora_rank=8
    )
    stepper = EngineStepper(build_engine_parts(config))
    prompt = tokenizer("The capital of France is a city where", add_special_tokens=False)["input_ids"]
    sampling = SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=TOP, prompt_logprobs=TOP
    )
    for request_id, lora in (("base", None), ("smol", "smol")):
        assert (
            stepper.add(AddRequest(request_id, prompt, sampling, time.time(), lora_name=lora), b"t", [])
            is None
        )
    deltas: dict[str, list[RequestDelta]] = {}
    while stepper.has_work:
        for _client, delta in stepper.step():
            deltas.setdefault(delta.request_id, []).append(delta)
    assert stepper.max_step_num_seqs == 2  # one batch

    generated = {rid: [t for d in ds for t in d.new_token_ids] for rid, ds in deltas.items()}
    base_reference = reference_logprobs(hf_model, prompt + generated["base"])
    _check(deltas["base"], base_reference, len(prompt))
    # peft's own forward (base + scale * B A x) on the shared oracle, then taken back out of it.
    peft_model = PeftModel.from_pretrained(hf_model, adapter_dir).eval()
    try:
        adapter_reference = reference_logprobs(peft_model, prompt + generated["smol"])
    finally:
        peft_model.unload()
    _check(deltas["smol"], adapter_reference, len(prompt))
    changed = (adapter_reference[: len(prompt)] - base_reference[: len(prompt)]).abs().max()
    assert changed > 0.05, "the adapter barely changes the model: the comparison would prove little"
