"""Maps Hugging Face `architectures[0]` names to Tandem model classes."""

from __future__ import annotations

from engine.models.llama import LlamaForCausalLM, MistralForCausalLM
from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.qwen3 import Qwen3ForCausalLM

# Every family extends the Llama decoder, so they share its constructor and load_weights.
MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(architecture: str) -> type[LlamaForCausalLM]:
    cls = MODEL_REGISTRY.get(architecture)
    if cls is None:
        raise ValueError(
            f"model architecture {architecture!r} is not supported (supported: {sorted(MODEL_REGISTRY)})"
        )
    return cls
