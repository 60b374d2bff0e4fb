"""Reading PEFT adapters: what is refused (with a 400 and the reason) and what is read, on a tiny Llama."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loader import load_model
from engine.lora.adapter import LoraError
from engine.lora.manager import LoraManager
from protocol.messages import LoraAdapter
from tests.engine.lora_adapters import base_model, edit_adapter_config, make_peft_adapter


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def good_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(base_model(model_dir), tmp_path_factory.mktemp("lora") / "good", seed=3, rank=4)


@pytest.fixture
def manager(model_dir: Path) -> LoraManager:
    model = load_model(str(model_dir), dtype="float32").model
    return LoraManager(model, max_loras=2, max_rank=8, max_cpu_loras=2, device=torch.device("cpu"))


@pytest.fixture
def adapter(good_adapter: Path, tmp_path: Path) -> Path:
    """A fresh copy of a valid adapter for a test to break."""
    return Path(shutil.copytree(good_adapter, tmp_path / "adapter"))


def _rewrite_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_a_valid_adapter_is_read_with_its_rank_and_scale(manager: LoraManager, adapter: Path) -> None:
    registered = manager.load(LoraAdapter("good", str(adapter)))
    assert registered.rank == 4
    weights = manager.resolve("good")
    assert weights.scale == 16 / 4  # lora_alpha 16, r 4
    # q, k and v land in the three parts of layer 0's merged qkv_proj.
    qkv = weights.parts["model.layers.0.self_attn.qkv_proj"]
    assert all(part is not None for part in qkv)


def test_rslora_scales_by_the_square_root_of_the_rank(manager: LoraManager, adapter: Path) -> None:
    edit_adapter_config(adapter, use_rslora=True)
    manager.load(LoraAdapter("rs", str(adapter)))
    assert math.isclose(manager.resolve("rs").scale, 16 / math.sqrt(4))


REFUSALS: dict[str, tuple[dict[str, object], str]] = {
    "rank above the maximum": ({"r": 16}, "above --max-lora-rank 8"),
    "bias": ({"bias": "all"}, "bias"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "DoRA": ({"use_dora": True}, "DoRA"),
    "rank_pattern": ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    "another PEFT method": ({"peft_type": "IA3"}, "peft_type"),
    "a non-integer rank": ({"r": "four"}, "r must be a positive integer"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_unsupported_configs_are_refused_with_the_reason(
    manager: LoraManager, adapter: Path, case: str
) -> None:
    changes, reason = REFUSALS[case]
    edit_adapter_config(adapter, **changes)
    with pytest.raises(LoraError, match=reason) as refused:
        manager.load(LoraAdapter("x", str(adapter)))
    assert refused.value.status == 400
    assert manager.adapters == {}


def test_an_embedding_target_is_refused(manager: LoraManager, adapter: Path) -> None:
    def add_embedding(tensors: dict[str, torch.Tensor]) -> None:
        tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(4, 512)
        tensors["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(64, 4)

    _rewrite_weights(adapter, add_embedding)
    with pytest.raises(LoraError, match="'embed_tokens'.*not supported"):
        manager.load(LoraAdapter("x", str(adapter)))


def test_a_layer_the_model_lacks_is_refused(manager: LoraManager, adapter: Path) -> None:
    def add_layer(tensors: dict[str, torch.Tensor]) -> None:
        for kind, shape in (("lora_A", (4, 64)), ("lora_B", (64, 4))):
            tensors[f"base_model.model.model.layers.7.self_attn.q_proj.{kind}.weight"] = torch.zeros(shape)

    _rewrite_weights(adapter, add_layer)
    with pytest.raises(LoraError, match="has no module 'model.layers.7.self_attn.q_proj'"):
        manager.load(LoraAdapter("x", str(adapter)))


def test_shapes_that_do_not_fit_are_refused(manager: LoraManager, adapter: Path) -> None:
    def widen(tensors: dict[str, torch.Tensor]) -> None:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = torch.zeros(4, 65)

    _rewrite_weights(adapter, widen)
    with pytest.raises(LoraError, match="do not fit the model"):
        manager.load(LoraAdapter("x", str(adapter)))


def test_missing_or_unreadable_files_are_refused(manager: LoraManager, adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(LoraError, match="adapter_config.json is missing"):
        manager.load(LoraAdapter("x", str(tmp_path / "nowhere")))
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoraError, match="cannot read"):
        manager.load(LoraAdapter("x", str(adapter)))
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraError, match="adapter_model.safetensors is missing"):
        manager.load(LoraAdapter("x", str(adapter)))
    (adapter / "adapter_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(LoraError, match="JSON object"):
        manager.load(LoraAdapter("x", str(adapter)))


def test_names_are_unique_and_unload_needs_a_loaded_name(manager: LoraManager, adapter: Path) -> None:
    manager.load(LoraAdapter("a", str(adapter)))
    with pytest.raises(LoraError, match="already loaded") as taken:
        manager.load(LoraAdapter("a", str(adapter)))
    assert taken.value.status == 400
    with pytest.raises(LoraError) as unknown:
        manager.unload("b")
    assert unknown.value.status == 404


def test_adapters_beyond_max_cpu_loras_are_read_again_when_used(manager: LoraManager, adapter: Path) -> None:
    manager.load(LoraAdapter("a", str(adapter)))
    held = manager.resolve("a")
    assert manager.resolve("a") is held  # cached
    manager.load(LoraAdapter("b", str(adapter)))
    manager.load(LoraAdapter("c", str(adapter)))  # at most 2 held: "a" leaves memory
    again = manager.resolve("a")
    assert again is not held  # read from its folder again, under the same identity (slots, KV blocks)
    assert again.uid == held.uid and again.cache_key == held.cache_key
    assert set(manager.adapters) == {"a", "b", "c"}
    key = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(again.parts[key][0], held.parts[key][0])
