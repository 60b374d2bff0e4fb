"""GGUF block kernels on CPU (engine/kernels/cpu_quant.c, engine/layers/gguf_packed.py): products against
Q4_0, Q4_1 and Q8_0 blocks equal, in float64, the dequantized weights times the activations as the kernel
quantizes them (two int8 levels per block of 32), and stay within that quantization's bound of the exact
product; layers route by row count, the default model decodes as with its dense weights, and a host
without a compiler keeps the dense path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.kernels import cpu_quant
from engine.layers.gguf_packed import (
    EXACT_MAX_ROWS,
    BlockRows,
    ExactPackedWeight,
    PackedWeight,
    _u4_values,
    attach_packed_weights,
    pack_gguf_tensor,
)
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


def _kernel_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float32 as cpu_quant.c's quantize_rows writes it, in float64: s * (a1 + a2 / 256) per block
    of 32 with s = max|x| / 127; and each block's step s / 256 (the bound below uses half of it)."""
    blocks = x.view(x.shape[0], -1, cpu_quant.BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))  # true division
    v = blocks * inv  # float32 ops, as in C
    hi = torch.round(v)
    lo = torch.clamp(torch.round((v - hi) * 256.0), -127, 127)
    step = (amax / 127.0 / 256.0).double()
    return (step * (256 * hi.double() + lo.double())).view_as(x), step.squeeze(-1)


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
    packed_kernel = packed.pack()
    assert packed_kernel.shape == (n, k) and packed_kernel.kind == packed.kind
    # The weights as the kernel splits them, w = d * q + m: the d * q part meets the rounded activations,
    # the offset part the exact ones (the kernel multiplies m by each block's float sum of x).
    d = packed.scales.double().repeat_interleave(cpu_quant.BLOCK, dim=1)
    if packed.offsets is None:
        scaled, offset = d * packed.q.double(), torch.zeros(n, k, dtype=torch.float64)
    else:
        scaled = d * _u4_values(packed.q, k // cpu_quant.BLOCK).double()
        offset = packed.offsets.double().repeat_interleave(cpu_quant.BLOCK, dim=1)
    torch.testing.assert_close(scaled + offset, _dequantized(tensor), rtol=0, atol=0)  # the file's values
    torch.manual_seed(0)
    bias = torch.randn(n)
    for rows in (1, 2, 3, 4, 5, 8, 9, 13, 33, 64, 65, 130):  # tiles of 8 (AVX2: 4), chunks of 64 rows
        x = torch.randn(rows, k) * torch.rand(rows, 1) * 10
        x[0, :32] = 0  # an all-zero block
        x_kernel, step = _kernel_activations(x)
        for b in (None, bias):
            extra = 0 if b is None else b.double()
            got = packed_kernel.linear(x, b)
            assert got.dtype == torch.float32 and got.shape == (rows, n)
            # What the kernel computes, up to float32 rounding of its sums.
            expected = x_kernel @ scaled.T + x.double() @ offset.T + extra
            torch.testing.assert_close(
                got.double(), expected, rtol=0, atol=2e-6 * float(expected.abs().max())
            )
            # And within the activation rounding's bound of the exact product: |x - x_kernel| <= step / 2.
            exact = x.double() @ (scaled + offset).T + extra
            bound = (step.repeat_interleave(cpu_quant.BLOCK, dim=1) / 2) @ scaled.abs().T
            assert bool(((got.double() - exact).abs() <= bound * 1.01 + 1e-6).all())
            assert not torch.equal(x_kernel, x.double())  # the rounding is real: the bound is not vacuous


@pytest.mark.parametrize("kind", TYPES)
def test_exact_products_equal_the_dequantized_weights_product(
    kernels: None, kind: str, tmp_path: Path
) -> None:
    """The float32 kernel an explicit --dtype gets (cpu_exact.c): no activation rounding."""
    rng = np.random.default_rng(0)
    n, k = 72, 160
    tensor = _gguf_tensors(tmp_path, {"w.weight": (rng.standard_normal((n, k)).astype(np.float32), kind)})[
        "w.weight"
    ]
    rows_form = pack_gguf_tensor(tensor)
    assert rows_form is not None
    exact = rows_form.pack_exact()
    assert exact.shape == (n, k) and exact.max_rows == EXACT_MAX_ROWS
    reference = _dequantized(tensor)
    torch.manual_seed(0)
    bias = torch.randn(n)
    for rows in (1, 2, 3, 4, 5, 8, 9, 13, 33):
        x = torch.randn(rows, k)
        for b in (None, bias):
            expected = x.double() @ reference.T + (0 if b is None else b.double())
            got = exact.linear(x, b)
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
    rows = pack_gguf_tensor(tensor)
    assert rows is not None
    x = torch.randn(11, 96)
    for packed in (rows.pack(), rows.pack_exact()):
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
    layer.packed_weight = BlockRows.cat([pack_gguf_tensor(tensors[name]) for name in parts]).pack(max_rows=4)  # type: ignore[misc]
    dense = torch.nn.functional.linear
    small, big = torch.randn(4, 64), torch.randn(5, 64)
    assert torch.equal(layer(big), dense(big, layer.weight, layer.bias))  # past max_rows: the dense weight
    # Within the activation rounding (about 2^-15 of each block's largest value; exact bounds above).
    torch.testing.assert_close(layer(small), dense(small, layer.weight, layer.bias), rtol=0, atol=2e-3)
    assert not torch.equal(layer(small), dense(small, layer.weight, layer.bias))  # really the block kernel


def test_default_model_keeps_blocks_for_every_layer_and_decodes_like_its_dense_weights(
    kernels: None, default_loaded_model: LoadedModel
) -> None:
    auto = load_model(None)  # --dtype auto: float32 activations, the integer kernel
    exact = default_loaded_model  # an explicit float32: the exact float32 kernel
    dense = load_model(None, dtype="float32", gguf_cpu_kernels=False)
    assert auto.dtype == exact.dtype == dense.dtype == torch.float32
    arch = auto.arch
    for loaded, kind in ((auto, PackedWeight), (exact, ExactPackedWeight)):
        packed = [
            m.packed_weight for m in loaded.model.modules() if getattr(m, "packed_weight", None) is not None
        ]
        assert len(packed) == 4 * arch.num_hidden_layers + 1  # qkv, o, gate/up, down per layer; the tied head
        assert all(isinstance(p, kind) for p in packed)
        head = loaded.model.lm_head.packed_weight
        assert head is not None and head.kind == "i8"  # the file's Q8_0 token embedding, tied to the head
        layer = loaded.model.model.layers[0].self_attn.qkv_proj
        assert (
            isinstance(layer, Linear) and layer.packed_weight is not None and layer.packed_weight.kind == "u4"
        )
    assert not [m for m in dense.model.modules() if getattr(m, "packed_weight", None) is not None]
    # Same weights: a few-row product through the blocks equals the dense one (exactly up to summation
    # order; the integer kernel up to its activation rounding); rows in the wrong order would be off by
    # the outputs' own size. q and k too: their rows are un-permuted as the dense weights are.
    x = torch.randn(3, arch.hidden_size)
    dense_layer = dense.model.model.layers[0].self_attn.qkv_proj
    dense_out = torch.nn.functional.linear(x, dense_layer.weight)
    exact_layer = exact.model.model.layers[0].self_attn.qkv_proj
    torch.testing.assert_close(exact_layer(x), dense_out, rtol=0, atol=1e-4)
    auto_layer = auto.model.model.layers[0].self_attn.qkv_proj
    torch.testing.assert_close(auto_layer(x), dense_out, rtol=0, atol=1e-3 * float(dense_out.abs().max()))
    # Greedy decoding through the whole model: the same tokens; logits within float32 rounding (exact) or
    # the activation rounding (auto: 30 layers of it move logits, about -10 to 25 here, by at most ~0.01,
    # what benchmarks/int8_fidelity.py measures as 100% top-1 agreement with float32).
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

    tokens_dense, logits_dense = greedy(dense)
    tokens_exact, logits_exact = greedy(exact)
    tokens_auto, logits_auto = greedy(auto)
    assert tokens_exact == tokens_auto == tokens_dense
    torch.testing.assert_close(logits_exact, logits_dense, rtol=0, atol=2e-3)
    torch.testing.assert_close(logits_auto, logits_dense, rtol=0, atol=3e-2)


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


def test_an_engine_frees_the_dense_weights_its_blocks_replace(kernels: None) -> None:
    from engine.config import EngineConfig
    from engine.engine_setup import build_engine_parts

    def linear_sizes(enable_lora: bool) -> tuple[list[int], int]:
        config = EngineConfig(dtype="auto", kv_cache_memory=32 * 2**20, enable_lora=enable_lora)
        model = build_engine_parts(config).runner.model
        sizes = [m.weight.numel() for m in model.modules() if isinstance(m, Linear)]
        return sizes, model.lm_head.weight.numel()

    sizes, head = linear_sizes(enable_lora=False)
    arch = load_model(None).arch
    assert head == arch.vocab_size * arch.hidden_size  # the head's weight is the embedding table: kept
    assert len(sizes) == 4 * arch.num_hidden_layers
    if cpu_quant.has_vnni():  # the blocks serve every row count: the dense copies are gone
        assert set(sizes) == {0}
    else:  # AVX2: steps past AVX2_MAX_ROWS rows still need them
        assert 0 not in sizes
    lora_sizes, _ = linear_sizes(enable_lora=True)  # LoRA adds to the dense weights: kept
    assert 0 not in lora_sizes
