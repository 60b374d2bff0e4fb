"""PEFT LoRA adapters for tests, made with peft itself (the reference implementation), and the merged
transformers models they are checked against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load_base(model_dir: Path | str, gguf_file: str | None = None) -> torch.nn.Module:
    import transformers

    if gguf_file is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, gguf_file=gguf_file, dtype=torch.float32
        ).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_peft_adapter(
    base: torch.nn.Module,
    out_dir: Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: float = 16,
    targets: list[str] | None = None,
    use_rslora: bool = False,
    std: float = 0.05,
) -> Path:
    """Saves a LoRA adapter for `base` with random A and B (PEFT starts B at zero, which would make the
    adapter a no-op) and returns its folder. `base` is left unchanged."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets or ALL_TARGETS,
        lora_dropout=0.0,
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # takes the LoRA layers back out of `base`
    return out_dir


def merged_model(base_dir: Path | str, adapter_dir: Path, gguf_file: str | None = None) -> torch.nn.Module:
    """transformers + peft reference: the base model with the adapter merged into its weights."""
    from peft import PeftModel

    base = _load_base(base_dir, gguf_file)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


def base_model(base_dir: Path | str, gguf_file: str | None = None) -> torch.nn.Module:
    return _load_base(base_dir, gguf_file)


def edit_adapter_config(adapter_dir: Path, **changes: Any) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] log-softmax of the logits at every position (predicting the next token)."""
    logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def reference_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt` (no EOS stop): the tokens an engine must produce."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()
