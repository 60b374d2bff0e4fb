"""ModelArchConfig: the shape of a decoder-only model, from a Hugging Face config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# GGUF `general.architecture` -> the Hugging Face class name our registry knows.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None for plain rope; else has "rope_type" and its parameters
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str  # checkpoint dtype name, e.g. "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArchConfig:
        architectures = config.get("architectures") or []
        if not architectures:
            raise ValueError("config.json has no 'architectures' entry")
        num_heads = int(config["num_attention_heads"])
        hidden_size = int(config["hidden_size"])
        rope_theta, rope_scaling = _hf_rope(config)
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=architectures[0],
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases, and its config does not say so.
            attention_bias=bool(config.get("attention_bias", architectures[0] == "Qwen2ForCausalLM")),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], *, has_output_weight: bool) -> ModelArchConfig:
        arch = metadata.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"GGUF architecture {arch!r} is not supported (supported: {sorted(GGUF_ARCHITECTURES)})"
            )

        def get(key: str, default: Any = None) -> Any:
            return metadata.get(f"{arch}.{key}", default)

        hidden_size = int(get("embedding_length"))
        num_heads = int(get("attention.head_count"))
        rope_scaling = None
        if get("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        elif get("rope.scaling.type") not in (None, "none"):
            raise ValueError(f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported")
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        vocab_size = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ()))
        return cls(
            architecture=GGUF_ARCHITECTURES[arch],
            vocab_size=int(vocab_size),
            hidden_size=hidden_size,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(get("attention.head_count_kv") or num_heads),
            head_dim=int(get("attention.key_length") or hidden_size // num_heads),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=not has_output_weight,
            attention_bias=arch == "qwen2",
            torch_dtype="float32",
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )


def _hf_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either transformers 5's `rope_parameters` or 4's keys."""
    params = dict(config.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = params or dict(config.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    return theta, {**scaling, "rope_type": rope_type}
