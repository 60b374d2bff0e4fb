"""GGUF block kernels on CPU (engine/kernels/cpu_quant.c, engine/layers/gguf_packed.py): products against
Q4_0, Q4_1 and Q8_0 blocks equal the dequantized weights' product in float64, layers route by row count,
the default model decodes as with its dense weights, and a host without a compiler keeps the dense path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.kernels import cpu_quant
from engine.layers.gguf_packed import PackedWeight, attach_packed_weights, pack_gguf_tensor
from engine.layers.linear import Linear, MergedLinear
from engine.loader import LoadedModel, load_model
from tests.engine.cpu_kernels import require_cpu_kernels

TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def _gguf_tensors(tmp_path: Path, weights: dict[str, tuple[np.ndarray, str]]) -> dict[str, Any]:
    """Writes float32 weights quantized to the given types into a GGUF file; its reader's tensors by name."""
    import gguf

    path = tmp_path / "blocks.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (values, kind) in weights.items():
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _dequantized(tensor: Any) -> torch.Tensor:
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
    return torch.from_numpy(values.reshape(int(tensor.shape[1]), int(tensor.shape[0])))


@pytest.fixture(scope="module")
def kernels() -> None:
    require_cpu_kernels()


@pytest.mark.parametrize("kind", TYPES)
def test_block_products_equal_the_dequantized_weights_product(
    kernels: None, kind: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    n, k = 72, 160  # several blocks per row, an output count no tile size divides
    tensor = _gguf_tensors(tmp_path, {"w.weight": (rng.standard_normal((n, k)).astype(np.float32), kind)})[
        "w.weight"
    ]
    packed = pack_gguf_tensor(tensor)
    assert packed is not None and packed.shape == (n, k)
    assert packed.kind == ("i8" if kind == "Q8_0" else "u4")
    reference = _dequantized(tensor)
    torch.manual_seed(0)
    bias = torch.randn(n)
    for rows in (1, 2, 3, 4, 5, 8, 9, 13, 33):
        x = torch.randn(rows, k)
        for b in (None, bias):
            expected = x.double() @ reference.T + (0 if b is None else b.double())
            got = packed.linear(x, b)
            assert got.dtype == torch.float32 and got.shape == (rows, n)
            torch.testing.assert_close(
                got.double(), expected, rtol=0, atol=2e-5 * float(expected.abs().max())
            )


def test_each_row_gets_the_same_result_whatever_the_batch(kernels: None, tmp_path: Path) -> None:
    """The sum order of a row does not depend on how many rows share the call (batch invariance), so a
    speculative 4-row verify step computes what four 1-row steps would."""
    rng = np.random.default_rng(1)
    tensor = _gguf_tensors(
        tmp_path, {"w.weight": (rng.standard_normal((40, 96)).astype(np.float32), "Q4_1")}
    )["w.weight"]
    packed = pack_gguf_tensor(tensor)
    assert packed is not None
    x = torch.randn(11, 96)
    together = packed.linear(x, None)
    for r in range(11):
        assert torch.equal(packed.linear(x[r : r + 1], None), together[r : r + 1])


def test_unsupported_types_and_shapes_are_left_dense(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tensors = _gguf_tensors(
        tmp_path,
        {
            "f32.weight": (rng.standard_normal((8, 64)).astype(np.float32), "F32"),
            "q5.weight": (rng.standard_normal((8, 64)).astype(np.float32), "Q5_0"),
        },
    )
    assert pack_gguf_tensor(tensors["f32.weight"]) is None
    assert pack_gguf_tensor(tensors["q5.weight"]) is None


def test_layers_use_blocks_up_to_max_rows_and_the_dense_weight_beyond(kernels: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    parts = {
        f"p{i}.weight": (rng.standard_normal((n, 64)).astype(np.float32), "Q8_0")
        for i, n in enumerate([32, 16])
    }
    tensors = _gguf_tensors(tmp_path, parts)
    layer = MergedLinear(64, [32, 16], bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([_dequantized(tensors[name]) for name in parts]).float())
        layer.bias.normal_()
    layer.packed_weight = PackedWeight.cat([pack_gguf_tensor(tensors[name]) for name in parts], max_rows=4)  # type: ignore[misc]
    dense = torch.nn.functional.linear
    small, big = torch.randn(4, 64), torch.randn(5, 64)
    assert torch.equal(layer(big), dense(big, layer.weight, layer.bias))  # past max_rows: the dense weight
    torch.testing.assert_close(layer(small), dense(small, layer.weight, layer.bias), rtol=0, atol=1e-4)
    assert not torch.equal(layer(small), dense(small, layer.weight, layer.bias))  # really the block kernel


def test_default_model_keeps_blocks_for_every_layer_and_decodes_like_its_dense_weights(
    kernels: None, default_loaded_model: LoadedModel
) -> None:
    with_blocks = default_loaded_model  # float32, kernels on (the loader's default)
    dense = load_model(None, dtype="float32", gguf_cpu_kernels=False)
    packed = [m for m in with_blocks.model.modules() if getattr(m, "packed_weight", None) is not None]
    arch = with_blocks.arch
    assert len(packed) == 4 * arch.num_hidden_layers + 1  # qkv, o, gate/up, down per layer; the tied head
    assert not [m for m in dense.model.modules() if getattr(m, "packed_weight", None) is not None]
    head = with_blocks.model.lm_head.packed_weight
    assert head is not None and head.kind == "i8"  # the file's Q8_0 token embedding, tied to the head
    layer = with_blocks.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, Linear) and layer.packed_weight is not None and layer.packed_weight.kind == "u4"
    # Same weights: a few-row product through the blocks equals the dense one up to summation order, for
    # q and k too (their rows are un-permuted as the dense weights are).
    x = torch.randn(3, arch.hidden_size)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=0, atol=1e-4)
    # Greedy decoding through the whole model: the same tokens, logits within float32 rounding.
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])

    def greedy(loaded: LoadedModel) -> tuple[list[int], torch.Tensor]:
        from tests.engine.conftest import PagedBatchBuilder

        builder = PagedBatchBuilder(num_blocks=8, block_size=16, seed=0)
        caches = [
            torch.zeros(2, 8, 16, arch.num_key_value_heads, arch.head_dim)
            for _ in range(arch.num_hidden_layers)
        ]
        tokens, last = ids[0].tolist(), []
        meta, positions = builder.step({0: len(tokens)})
        with torch.no_grad():
            feed = torch.tensor(tokens)
            for _ in range(8):
                logits = loaded.model.compute_logits(loaded.model(feed, positions, caches, meta))[-1]
                last.append(logits)
                tokens.append(int(logits.argmax()))
                feed = torch.tensor(tokens[-1:])
                meta, positions = builder.step({0: 1})
        return tokens, torch.stack(last)

    tokens_blocks, logits_blocks = greedy(with_blocks)
    tokens_dense, logits_dense = greedy(dense)
    assert tokens_blocks == tokens_dense
    torch.testing.assert_close(logits_blocks, logits_dense, rtol=0, atol=2e-3)


def test_without_a_compiler_the_model_keeps_its_dense_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no cc
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # and no kernel built before
    cpu_quant.library.cache_clear()
    try:
        assert cpu_quant.library() is None
        loaded = load_model(None, dtype="float32")
        assert not [m for m in loaded.model.modules() if getattr(m, "packed_weight", None) is not None]
    finally:
        cpu_quant.library.cache_clear()


def test_attach_skips_a_model_without_matching_layers(kernels: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    tensors = _gguf_tensors(
        tmp_path, {"blk.0.attn_output.weight": (rng.standard_normal((8, 64)).astype(np.float32), "Q8_0")}
    )

    class Reader:
        def __init__(self) -> None:
            self.tensors = list(tensors.values())

    model = torch.nn.Module()
    metadata = {"general.architecture": "qwen2", "qwen2.attention.head_count": 1}
    assert attach_packed_weights(model, Reader(), metadata) == 0


def test_the_library_is_built_where_it_can_be_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """systemd's CacheDirectory= first (the engine unit hides /home); a home that cannot be written to
    (here: a file where the folder should be) falls through to the temp directory."""
    require_cpu_kernels()
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "unit-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no build from earlier runs to find
    monkeypatch.setattr(cpu_quant.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cpu_quant.library.cache_clear()
    try:
        assert cpu_quant.library() is not None
        assert list((tmp_path / "unit-cache" / "kernels").glob("cpu_quant-*.so"))
        monkeypatch.delenv("CACHE_DIRECTORY")
        blocked_home = tmp_path / "home"
        blocked_home.write_text("not a folder")
        monkeypatch.setenv("HOME", str(blocked_home))
        cpu_quant.library.cache_clear()
        assert cpu_quant.library() is not None
        assert list((tmp_path / "tmp").glob("tandem-*/kernels/cpu_quant-*.so"))
    finally:
        cpu_quant.library.cache_clear()
