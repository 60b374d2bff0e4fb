"""The engine's adapters: which names are registered, which weights are held in memory, and which
adapter sits in each of the --max-loras slots of the LoRA layers for the step being run."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from engine.lora.adapter import LoraError, LoraWeights, read_peft_adapter
from engine.lora.layers import LoraBatch, LoraLinear, target_modules, wrap_model
from engine.readback import to_device
from engine.request import Request
from protocol.messages import LoraAdapter

logger = logging.getLogger(__name__)

LORA_DISABLED = "LoRA is not enabled (start with --enable-lora)"


def model_not_found(name: str) -> LoraError:
    return LoraError(f"The model `{name}` does not exist.", status=404)


class LoraManager:
    """Registered adapters (by name), an LRU of loaded weights (at most --max-cpu-loras; an evicted one
    is read from its folder again when a request names it), and the slot table of the LoRA layers.

    A request holds its own reference to the weights it was admitted with, so unloading an adapter
    stops new requests at once while the running ones finish under the weights they started with."""

    def __init__(
        self, model: nn.Module, *, max_loras: int, max_rank: int, max_cpu_loras: int, device: torch.device
    ) -> None:
        if max_loras < 1 or max_rank < 1 or max_cpu_loras < max_loras:
            raise ValueError(
                "LoRA needs --max-loras >= 1, --max-lora-rank >= 1 and --max-cpu-loras >= --max-loras "
                f"(got {max_loras}, {max_rank}, {max_cpu_loras})"
            )
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.device = device
        self.batch = LoraBatch(max_loras, max_rank)
        self.layers: dict[str, LoraLinear] = wrap_model(model, self.batch)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no projections LoRA can adapt")
        self.targets = target_modules(self.layers)
        self._dtype = next(iter(self.layers.values())).lora_b.dtype  # the mask scales h for the expand
        self._slot_range = torch.arange(max_loras, device=device)  # [S]
        self.adapters: dict[str, LoraAdapter] = {}  # registered, in load order
        self._uids: dict[str, int] = {}  # name -> the uid of its registration
        self._cached: OrderedDict[str, LoraWeights] = OrderedDict()  # name -> weights, LRU first
        self._slots: list[LoraWeights | None] = [None] * max_loras
        self._slot_last_used = [0] * max_loras
        self._num_steps = 0

    # -- registry -------------------------------------------------------------------------------------
    def load(self, adapter: LoraAdapter) -> LoraAdapter:
        """Reads and registers an adapter; LoraError (400) if the name is taken or the files are unfit.
        Nothing changes for running requests, whatever the outcome."""
        if not adapter.name:
            raise LoraError("the adapter needs a name")
        if adapter.name in self.adapters:
            raise LoraError(f"an adapter named {adapter.name!r} is already loaded")
        weights = read_peft_adapter(adapter.name, adapter.path, self.targets, self.max_rank)
        registered = LoraAdapter(adapter.name, adapter.path, adapter.base_model_name, weights.rank)
        self.adapters[adapter.name] = registered
        self._uids[adapter.name] = weights.uid
        self._remember(weights)
        logger.info("LoRA adapter %r loaded from %s (rank %d)", adapter.name, adapter.path, weights.rank)
        return registered

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise LoraError(f"no LoRA adapter named {name!r} is loaded", status=404)
        del self.adapters[name]
        del self._uids[name]
        self._cached.pop(name, None)
        logger.info("LoRA adapter %r unloaded", name)

    def resolve(self, name: str) -> LoraWeights:
        """The weights for a request naming `name`: 404 unless registered; read again if evicted."""
        if name not in self.adapters:
            raise model_not_found(name)
        weights = self._cached.get(name)
        if weights is None:
            adapter = self.adapters[name]
            weights = read_peft_adapter(name, adapter.path, self.targets, self.max_rank, self._uids[name])
            self._remember(weights)
        self._cached.move_to_end(name)
        return weights

    def _remember(self, weights: LoraWeights) -> None:
        self._cached[weights.name] = weights
        while len(self._cached) > self.max_cpu_loras:
            self._cached.popitem(last=False)

    # -- one step -------------------------------------------------------------------------------------
    def prepare_step(self, scheduled: Sequence[tuple[Request, int]]) -> None:
        """Puts this step's adapters into slots and sets the per-token slot mask the layers read."""
        self._num_steps += 1
        row_slots = [self._slot_for(r.lora) if r.lora is not None else None for r, _ in scheduled]
        if all(slot is None for slot in row_slots):
            self.batch.set_step(None)
            return
        num_slots = self.max_loras
        token_slots: list[int] = []  # slot num_slots stands for "no adapter": it matches no column
        for slot, (_, num_new) in zip(row_slots, scheduled, strict=True):
            token_slots += [num_slots if slot is None else slot] * num_new
        # Only the slot ids travel to the device (queued, like the step's other inputs).
        slot_ids = to_device(token_slots, torch.int64, self.device)  # [T]
        per_token = slot_ids.unsqueeze(1) == self._slot_range  # [T, S]
        self.batch.set_step(per_token.to(self._dtype))

    def _slot_for(self, weights: LoraWeights) -> int:
        """The slot holding `weights`, writing them into a free or least recently used slot if needed.
        The scheduler admits at most --max-loras adapters at a time, so a step never needs more slots."""
        for slot, held in enumerate(self._slots):
            if held is not None and held.uid == weights.uid:
                self._slot_last_used[slot] = self._num_steps
                return slot
        slot = min(range(self.max_loras), key=lambda s: (self._slots[s] is not None, self._slot_last_used[s]))
        if self._slot_last_used[slot] == self._num_steps and self._slots[slot] is not None:
            raise RuntimeError(f"a step uses more than --max-loras ({self.max_loras}) adapters")
        for name, layer in self.layers.items():
            layer.set_slot(slot, weights.parts.get(name))
        self._slots[slot] = weights
        self._slot_last_used[slot] = self._num_steps
        return slot
