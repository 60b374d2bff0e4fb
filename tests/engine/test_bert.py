"""The BERT encoder and pooling against transformers' BertModel on a tiny seeded random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.embedding_runner import pool
from engine.loader.encoder_folder import PoolingConfig, read_pooling_config, resolve_encoder_path
from engine.models.bert import BertConfig, BertModel

SEED = 1234
HF_CONFIG = {
    "architectures": ["BertModel"],
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}


@pytest.fixture(scope="module")
def pair() -> tuple[BertModel, torch.nn.Module]:
    """Our BertModel and transformers' with the same random weights."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertModel as HFBertModel

    torch.manual_seed(SEED)
    hf = HFBertModel(HFBertConfig(**HF_CONFIG, attn_implementation="eager")).eval()
    ours = BertModel(BertConfig.from_hf_config(HF_CONFIG)).eval()
    ours.load_weights(hf.state_dict().items())
    return ours, hf


def _hf_hidden(hf: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Each sequence's last hidden states from one padded transformers batch."""
    max_len = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (max_len - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (max_len - len(s)) for s in sequences])
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    return [out[i, : len(s)] for i, s in enumerate(sequences)]


def test_flat_batch_matches_transformers_padded_batch(pair: tuple[BertModel, torch.nn.Module]) -> None:
    ours, hf = pair
    gen = torch.Generator().manual_seed(SEED)
    lengths = [7, 1, 33, 12]  # odd lengths, one of a single token
    sequences = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]
    flat = torch.tensor([t for s in sequences for t in s])
    with torch.no_grad():
        hidden = ours(flat, lengths)
    expected = torch.cat(_hf_hidden(hf, sequences))
    assert hidden.shape == expected.shape == (sum(lengths), 64)
    torch.testing.assert_close(hidden, expected, atol=2e-5, rtol=1e-4, msg=f"seed {SEED}")


def test_each_sequence_is_independent_of_its_batch(pair: tuple[BertModel, torch.nn.Module]) -> None:
    ours, _ = pair
    a, b = [5, 9, 11, 3], [100, 200]
    with torch.no_grad():
        together = ours(torch.tensor(a + b), [4, 2])
        alone = ours(torch.tensor(a), [4])
    torch.testing.assert_close(together[:4], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "mean_sqrt_len", "lasttoken"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pooling_modes(mode: str, normalize: bool) -> None:
    torch.manual_seed(SEED)
    lengths = [3, 1, 5]
    hidden = torch.randn(sum(lengths), 8)
    pooled = pool(hidden, lengths, PoolingConfig(mode, normalize, None, None))
    expected = []
    for chunk in hidden.split(lengths):
        expected.append(
            {
                "mean": chunk.mean(0),
                "cls": chunk[0],
                "max": chunk.max(0).values,
                "mean_sqrt_len": chunk.sum(0) / len(chunk) ** 0.5,
                "lasttoken": chunk[-1],
            }[mode]
        )
    reference = torch.stack(expected)
    if normalize:
        reference = reference / reference.norm(dim=1, keepdim=True)
    torch.testing.assert_close(pooled, reference)


def test_default_folder_declares_mean_pooling_and_normalize() -> None:
    folder, name = resolve_encoder_path(None)
    config = json.loads((folder / "config.json").read_text())
    pooling = read_pooling_config(folder, config)
    assert name == "all-MiniLM-L6-v2"
    assert pooling == PoolingConfig("mean", True, 256, None)


def test_pooling_config_variants(tmp_path: Path) -> None:
    assert read_pooling_config(tmp_path, {}) == PoolingConfig("cls", True, None, None)
    assert read_pooling_config(tmp_path, {"matryoshka_dimensions": [64, 128]}).matryoshka_dimensions == [
        64,
        128,
    ]
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling_config(tmp_path, {}) == PoolingConfig("cls", False, None, None)
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        read_pooling_config(tmp_path, {})


def test_unknown_checkpoint_tensor_is_an_error() -> None:
    model = BertModel(BertConfig.from_hf_config(HF_CONFIG))
    with pytest.raises(ValueError, match="no place"):
        model.load_weights([("encoder.layer.9.output.dense.weight", torch.zeros(64, 128))])
    with pytest.raises(ValueError, match="missing"):
        model.load_weights([("pooler.dense.weight", torch.zeros(64, 64))])
