"""Loader behaviour: sharded vs single safetensors, dummy weights, dtypes, tokenizer info, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from engine.loader import LoadedModel, load_model, resolve_model_path
from engine.loader.gguf_file import unpermute_rotary_rows
from tests.engine.conftest import PagedBatchBuilder, TinyModelDir


def _logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    arch = loaded.arch
    builder = PagedBatchBuilder(8, 4, seed=0)
    dtype = loaded.dtype
    kv_caches = [torch.zeros(2, 8, 4, arch.num_key_value_heads, arch.head_dim, dtype=dtype) for _ in range(2)]
    meta, positions = builder.step({0: len(ids)})
    with torch.no_grad():
        return loaded.model.compute_logits(loaded.model(torch.tensor(ids), positions, kv_caches, meta))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_folder_loads_like_single_file(tiny_model_dir: TinyModelDir, tmp_path: Path) -> None:
    single = tiny_model_dir("llama")
    sharded = tmp_path / "sharded"
    shutil.copytree(single, sharded)
    (sharded / "model.safetensors").unlink()
    tensors = load_file(single / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[::2], names[1::2])):
        filename = f"model-0000{shard + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / filename)
        weight_map.update(dict.fromkeys(part, filename))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    a, b = load_model(str(single)), load_model(str(sharded))
    state_a, state_b = _state(a.model), _state(b.model)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert b.default_served_name == "sharded"


def test_dummy_load_has_checkpoint_shapes_and_is_seeded(tiny_model_dir: TinyModelDir) -> None:
    folder = tiny_model_dir("qwen3")
    real = load_model(str(folder))
    dummy = load_model(str(folder), load_format="dummy", seed=3)
    again = load_model(str(folder), load_format="dummy", seed=3)
    real_state, dummy_state = _state(real.model), _state(dummy.model)
    assert {k: v.shape for k, v in real_state.items()} == {k: v.shape for k, v in dummy_state.items()}
    assert all(torch.equal(dummy_state[k], v) for k, v in _state(again.model).items())
    assert not torch.equal(real_state["model.embed_tokens.weight"], dummy_state["model.embed_tokens.weight"])
    assert torch.isfinite(_logits(dummy, [1, 2, 3])).all()


def test_dummy_load_from_gguf_metadata(default_gguf_path: Path) -> None:
    loaded = load_model(str(default_gguf_path), load_format="dummy")
    embed = loaded.model.model.embed_tokens.weight
    assert embed.shape == (49152, 576)
    assert loaded.model.model.layers[0].self_attn.qkv_proj.weight.shape == ((9 + 2 * 3) * 64, 576)
    assert len(loaded.model.model.layers) == 30
    assert loaded.default_served_name == "SmolLM2-135M-Instruct"


def test_bfloat16_load(tiny_model_dir: TinyModelDir) -> None:
    folder = tiny_model_dir("llama3_rope")
    full = load_model(str(folder), dtype="float32")
    half = load_model(str(folder), dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in half.model.parameters())
    # The rotary table stays float32: it is derived, and cast only at use.
    assert half.model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.dtype == torch.float32
    ids = [5, 77, 300, 12, 9, 41]
    got, expected = _logits(half, ids), _logits(full, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def test_tokenizer_info_from_folder(tiny_model_dir: TinyModelDir) -> None:
    info = load_model(str(tiny_model_dir("llama"))).tokenizer
    tokenizer = Tokenizer.from_str(info.tokenizer_json)
    assert info.bos_token == "<s>" and info.eos_token == "<|im_end|>"
    assert info.eos_token_ids == [4, 2]  # tokenizer eos, then generation_config's list
    assert info.add_bos_token
    assert info.special_tokens == {"pad_token": "<pad>", "unk_token": "<unk>"}
    assert info.chat_template is not None and "add_generation_prompt" in info.chat_template
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False).ids == [3]
    assert tokenizer.decode(tokenizer.encode("The quick fox").ids) == "The quick fox"


def test_resolve_default_model_path() -> None:
    path = resolve_model_path(None)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_unpermute_inverts_llama_cpp_row_order() -> None:
    num_heads, head_dim = 3, 8
    weight = torch.arange(num_heads * head_dim * 2, dtype=torch.float32).reshape(num_heads * head_dim, 2)
    # llama.cpp's conversion: rows of each head reordered from (2, D/2) to (D/2, 2).
    permuted = weight.reshape(num_heads, 2, head_dim // 2, 2).transpose(1, 2).reshape(weight.shape)
    assert torch.equal(unpermute_rotary_rows(permuted, num_heads), weight)


def test_bad_inputs_raise_clear_errors(tiny_model_dir: TinyModelDir, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither a .gguf file nor a folder with config.json"):
        load_model(str(tmp_path))
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_model(str(bad_gguf))
    with pytest.raises(ValueError, match="load_format"):
        load_model(str(tiny_model_dir("llama")), load_format="pickle")
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tiny_model_dir("llama")), dtype="int8")
    with pytest.raises(ValueError, match="needs a .gguf file"):
        load_model(str(tiny_model_dir("llama")), load_format="gguf")

    unsupported = tmp_path / "unsupported"
    shutil.copytree(tiny_model_dir("llama"), unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoForCausalLM"]}))
    with pytest.raises(ValueError, match="not supported"):
        load_model(str(unsupported))

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir("llama"), truncated)
    tensors = load_file(truncated / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, truncated / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_model(str(truncated))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir("llama"), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="safetensors"):
        load_model(str(corrupt))
