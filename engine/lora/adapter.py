"""Reads a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) into per-module
A/B matrices addressed by Tandem's module names, refusing what the batched LoRA layers cannot run."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.models.llama import STACKED_PARAMS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Hugging Face projections that Tandem's own modules hold whole (not as a part of a merged one).
PLAIN_TARGETS = ("o_proj", "down_proj")
SUPPORTED_TARGETS = (*STACKED_PARAMS, *PLAIN_TARGETS)
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (an adapter name may sit before .weight)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[\w-]+)?\.weight$")
_uids = itertools.count(1)


class LoraError(ValueError):
    """An adapter that cannot be loaded or used; `status` is the HTTP status the asker gets."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TargetModule:
    """One projection Tandem's model can adapt: its module path, input size and output part sizes."""

    in_features: int
    output_sizes: tuple[int, ...]


@dataclass(eq=False)
class LoraWeights:
    """A loaded adapter. `parts[module][p]` is (A [r, in], B [out_p, r] already multiplied by the scale)
    for part p of Tandem's module (q/k/v of qkv_proj, gate/up of gate_up_proj), or None where the
    adapter leaves that part alone. Each registration gets a new uid (kept when evicted weights are
    read again): slots and prefix-cache keys use it, so a name unloaded and loaded again from other
    files never meets the old weights or their KV blocks."""

    name: str
    path: str
    rank: int
    scale: float
    parts: dict[str, list[tuple[Tensor, Tensor] | None]]
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def cache_key(self) -> str:
        return f"lora:{self.uid}"


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LoraError(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{path} must hold a JSON object")
    return config


def _check_config(config: dict[str, Any], max_rank: int) -> tuple[int, float]:
    """(rank, scale) of a LoRA config this engine can run; LoraError names the first unsupported setting."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraError(f"only LoRA adapters are supported, not peft_type {peft_type!r}")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoraError(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise LoraError(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    if rank > max_rank:
        raise LoraError(f"the adapter's rank {rank} is above --max-lora-rank {max_rank}")
    refusals = {
        "bias": (config.get("bias", "none") != "none", "bias other than 'none' is not supported"),
        "lora_bias": (bool(config.get("lora_bias")), "lora_bias is not supported"),
        "modules_to_save": (bool(config.get("modules_to_save")), "modules_to_save is not supported"),
        "use_dora": (bool(config.get("use_dora")), "DoRA (use_dora) is not supported"),
        "rank_pattern": (bool(config.get("rank_pattern")), "per-module rank_pattern is not supported"),
        "alpha_pattern": (bool(config.get("alpha_pattern")), "per-module alpha_pattern is not supported"),
        "layer_replication": (bool(config.get("layer_replication")), "layer_replication is not supported"),
    }
    for refused, reason in refusals.values():
        if refused:
            raise LoraError(f"adapter_config.json: {reason}")
    # fan_in_fan_out only matters for GPT-2 style Conv1D bases; PEFT itself turns it off for nn.Linear
    # targets (every Llama-family projection), and lora_A/lora_B are stored the same way either way.
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scale)


def _place(hf_module: str, targets: dict[str, TargetModule]) -> tuple[str, int]:
    """HF module path -> (Tandem module path, part index), e.g. layers.0.self_attn.k_proj -> qkv_proj, 1."""
    parent, _, leaf = hf_module.rpartition(".")
    if leaf in STACKED_PARAMS:
        merged, index = STACKED_PARAMS[leaf]
        module, part = f"{parent}.{merged}", index
    elif leaf in PLAIN_TARGETS:
        module, part = hf_module, 0
    else:
        raise LoraError(
            f"target module {leaf!r} ({hf_module}) is not supported; LoRA targets must be among "
            f"{', '.join(SUPPORTED_TARGETS)}"
        )
    if module not in targets:
        raise LoraError(f"the model has no module {hf_module!r} for the adapter to target")
    return module, part


def read_peft_adapter(
    name: str, path: str, targets: dict[str, TargetModule], max_rank: int, uid: int | None = None
) -> LoraWeights:
    """Loads and checks an adapter; `targets` maps Tandem module paths to their shapes."""
    folder = Path(path).expanduser()
    config = _read_config(folder)
    rank, scale = _check_config(config, max_rank)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise LoraError(f"{folder}: {WEIGHTS_FILE} is missing (only the safetensors layout is read)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise LoraError(f"cannot read {weights_path}: {exc}") from None
    pairs: dict[tuple[str, int], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise LoraError(f"{key}: embedding targets and DoRA are not supported")
            raise LoraError(f"{WEIGHTS_FILE}: unexpected tensor {key!r}")
        pairs.setdefault(_place(match["module"], targets), {})[match["kind"]] = tensor
    if not pairs:
        raise LoraError(f"{WEIGHTS_FILE} holds no lora_A/lora_B weights")
    parts: dict[str, list[tuple[Tensor, Tensor] | None]] = {}
    for (module, part), ab in sorted(pairs.items()):
        target = targets[module]
        lora_a, lora_b = ab.get("lora_A"), ab.get("lora_B")
        if lora_a is None or lora_b is None:
            raise LoraError(f"{module} part {part}: the adapter has lora_A or lora_B, not both")
        want_a, want_b = (rank, target.in_features), (target.output_sizes[part], rank)
        if tuple(lora_a.shape) != want_a or tuple(lora_b.shape) != want_b:
            raise LoraError(
                f"{module} part {part}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} "
                f"do not fit the model (expected {want_a} and {want_b})"
            )
        a, b = lora_a.float(), lora_b.float() * scale
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoraError(f"{module} part {part}: the adapter holds non-finite weights")
        parts.setdefault(module, [None] * len(target.output_sizes))[part] = (a, b)
    weights = LoraWeights(name=name, path=str(path), rank=rank, scale=scale, parts=parts)
    if uid is not None:
        weights.uid = uid
    return weights
