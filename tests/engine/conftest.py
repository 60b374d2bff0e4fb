"""Shared engine test fixtures: tiny seeded Hugging Face model folders and a paged-batch builder."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.loader import LoadedModel

TinyModelDir = Callable[[str], Path]  # tiny_model_dir(variant) -> saved HF folder

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# variant name -> (transformers config class name, extra config)
TINY_VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama3_rope": (
        "LlamaConfig",
        {
            "tie_word_embeddings": True,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        {"tie_word_embeddings": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True}),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tandem serves language models over an OpenAI-compatible API.",
    "def add(a, b):\n    return a + b\n",
    "Paged attention reads keys and values through a block table.",
    "Numbers like 12345 and 3.14159 appear in text too!",
]


def build_tiny_tokenizer_json() -> str:
    """A byte-level BPE with ~300 entries trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def write_tokenizer_files(folder: Path) -> None:
    (folder / "tokenizer.json").write_text(build_tiny_tokenizer_json())
    config = {
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))


def build_tiny_hf_model(variant: str, seed: int = 0, **shape: int) -> torch.nn.Module:
    """shape: TINY_SHAPE entries to change (e.g. num_key_value_heads=1, vocab_size=511)."""
    import transformers

    config_cls_name, extra = TINY_VARIANTS[variant]
    config = getattr(transformers, config_cls_name)(**{**TINY_SHAPE, **shape}, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Default init leaves norms at 1 and biases at 0; randomize them so their loading is tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelDir:
    """tiny_model_dir(variant) -> a saved HF folder (config, safetensors, tokenizer files), built once."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{variant}")
            build_tiny_hf_model(variant).save_pretrained(folder)
            write_tokenizer_files(folder)
            built[variant] = folder
        return built[variant]

    return get


class PagedBatchBuilder:
    """A toy block allocator that hands out shuffled (non-contiguous) block ids and builds
    AttentionMetadata for one step at a time. Block 0 is kept as the null block."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free_blocks = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}

    def step(self, num_new_tokens: dict[int, int]) -> tuple[AttentionMetadata, torch.Tensor]:
        """{seq_id: new tokens this step} -> (metadata, positions [T])."""
        query_start_loc, seq_lens, slots, positions = [0], [], [], []
        for seq_id, num_new in num_new_tokens.items():
            start = self.num_computed.get(seq_id, 0)
            seq_len = start + num_new
            table = self.block_tables.setdefault(seq_id, [])
            while len(table) * self.block_size < seq_len:
                table.append(self.free_blocks.pop())
            for pos in range(start, seq_len):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
                positions.append(pos)
            self.num_computed[seq_id] = seq_len
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(seq_len)
        max_blocks = max(len(self.block_tables[s]) for s in num_new_tokens)
        block_table = [
            self.block_tables[s] + [0] * (max_blocks - len(self.block_tables[s])) for s in num_new_tokens
        ]
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_table=torch.tensor(block_table, dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(num_new_tokens.values()),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        return meta, torch.tensor(positions, dtype=torch.int64)


@pytest.fixture
def paged_batch_builder() -> type[PagedBatchBuilder]:
    """The PagedBatchBuilder class: PagedBatchBuilder(num_blocks, block_size, seed)."""
    return PagedBatchBuilder


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from engine.loader import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def default_loaded_model() -> LoadedModel:
    """The default SmolLM2 GGUF loaded by Tandem (float32), once per session (~10 s)."""
    from engine.loader import load_model

    return load_model(None, dtype="float32")
