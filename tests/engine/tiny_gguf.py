"""Test helpers: a small SentencePiece model trained on a fixed corpus, and tiny Llama GGUF files written
the way llama.cpp's converter writes them (permuted Q/K rows, SentencePiece vocabulary, rope_freqs)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tandem serves language models over an OpenAI-compatible API.",
    "def add(a, b):\n    return a + b\n",
    "Paged attention reads keys and values through a block table.",
    "Numbers like 12345 and 3.14159 appear in text too!",
    "SentencePiece treats the input as a raw stream of characters, spaces included.",
    "Continuous batching keeps the accelerator busy while requests come and go.",
    "Café, naïve, résumé: accents are characters too.",
    "A scheduler decides which requests run in the next step and how many tokens each gets.",
    "The key-value cache is split into fixed-size blocks that several sequences can share.",
    "Prefix caching hashes every full block together with the hash of the block before it.",
    "Rotary position embeddings rotate pairs of query and key dimensions by an angle.",
    "Hello, world! How are you today? I am fine, thank you very much.",
    "for (int i = 0; i < 10; ++i) { total += values[i] * weights[i]; }",
    "Quantized weights are stored in blocks with a scale and sometimes a minimum.",
    "Sampling with temperature, top-p, top-k and min-p shapes the next-token distribution.",
]
USER_DEFINED = ["<|im_start|>"]
CONTROL = ["<|im_end|>"]

# sentencepiece.SentencePieceProcessor piece types, as GGUF's tokenizer.ggml.token_type numbers them.
NORMAL, UNKNOWN, CONTROL_TYPE, USER_DEFINED_TYPE, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class SpmVocab:
    processor: Any  # sentencepiece.SentencePieceProcessor, the reference tokenizer
    tokens: list[str]
    scores: list[float]
    token_types: list[int]


def train_sentencepiece(vocab_size: int, *, add_dummy_prefix: bool = True) -> SpmVocab:
    """A byte-fallback SentencePiece BPE with Llama 2's settings (identity normalization, a dummy prefix
    space, whitespace kept as is, digits split): unk 0, <s> 1, </s> 2, then CONTROL and USER_DEFINED."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 8),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        control_symbols=CONTROL,
        user_defined_symbols=USER_DEFINED,
        num_threads=1,
        minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    token_types = [_piece_type(sp, i, tokens[i]) for i in range(len(tokens))]
    return SpmVocab(sp, tokens, [sp.get_score(i) for i in range(len(tokens))], token_types)


def _piece_type(sp: Any, piece_id: int, piece: str) -> int:
    if sp.is_unknown(piece_id):
        return UNKNOWN
    if sp.is_control(piece_id):
        return CONTROL_TYPE
    if sp.is_byte(piece_id):
        return BYTE
    if sp.is_unused(piece_id):
        return UNUSED
    return USER_DEFINED_TYPE if piece in USER_DEFINED else NORMAL  # the Python API cannot tell these apart


def llama3_rope_freqs(config: Any) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it for rope_type "llama3": per frequency, the
    divisor that turns the plain inverse frequency into the scaled one.

    (The converter reads original_max_position_embeddings from the top level of config.json, where Llama
    3.1 has none, and falls back to 8192, Llama 3.1's value; this reads it from rope_scaling, where it is.)
    """
    scaling = config.rope_scaling
    theta = float(scaling.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    head_dim = config.head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_len = scaling["original_max_position_embeddings"]
    divisors = []
    for freq in inv_freq.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original_len / high:
            divisors.append(1.0)
        elif wavelen > original_len / low:
            divisors.append(factor)
        else:
            smooth = (original_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _permute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp's converter: each head's rows go from (2, head_dim / 2) to (head_dim / 2, 2) order.
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_tensors(model: Any) -> dict[str, np.ndarray]:
    config = model.config
    tensors: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = tensor.detach().float().numpy().copy()
        base, _, kind = name.rpartition(".")
        parts = base.split(".")
        if parts[:2] == ["model", "layers"]:
            gguf_base = f"blk.{parts[2]}.{_LAYER_TENSORS['.'.join(parts[3:])]}"
        else:
            gguf_base = _GLOBAL_TENSORS[base]
        if base.endswith("q_proj"):
            values = _permute_rotary_rows(values, config.num_attention_heads)
        elif base.endswith("k_proj"):
            values = _permute_rotary_rows(values, config.num_key_value_heads)
        tensors[f"{gguf_base}.{kind}"] = values
    return tensors


def write_llama_gguf(
    path: Path,
    model: Any,  # a transformers LlamaForCausalLM
    vocab: SpmVocab,
    *,
    rope_freqs: np.ndarray | None = None,
    chat_template: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A float32 llama-architecture GGUF of a transformers Llama model with a SentencePiece vocabulary.
    `extra` adds or overrides tokenizer keys (name -> value, or None to leave the key out)."""
    import gguf

    config = model.config
    if len(vocab.tokens) != config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab.tokens)} pieces, the model {config.vocab_size}")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(
        float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"])
    )
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    keys: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": vocab.tokens,
        "tokenizer.ggml.scores": vocab.scores,
        "tokenizer.ggml.token_type": vocab.token_types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": chat_template,
        **(extra or {}),
    }
    for key, value in keys.items():
        _add_key(writer, key, value)

    for name, values in _gguf_tensors(model).items():
        writer.add_tensor(name, values)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_key(writer: Any, key: str, value: Any) -> None:
    import gguf

    if value is None:
        return
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif key.endswith("scores"):
        writer.add_array(key, [float(v) for v in value])
    elif key.endswith("token_type"):
        writer.add_key_value(key, [int(v) for v in value], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
    else:
        writer.add_array(key, list(value))
