"""Adapter slots: which LoRA adapters are loaded, into which slot, and which wait for one.

The runner's model has `max_loras` slots per projection (models/lora.py). A request names an
adapter of the store (`SamplingParams.lora`); the engine core asks `acquire` for its slot when it
queues the sequence, and the slot stays held until the sequence finishes, so every step's adapters
are loaded. An adapter not loaded goes into a free slot, else into the least recently used slot
no sequence holds (the evicted adapter is reloaded from the store when next asked for); when every
slot is held the sequence waits here, outside the scheduler, until one is released. Pure
bookkeeping over names and slot numbers; the tensors are written by `write_slot`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from llmasos.errors import InvalidRequestError, LLMasOSError, ModelNotFoundError
from llmasos.models.lora import ADAPTER_CONFIG, read_lora, wrap_projections, write_slot

log = logging.getLogger("llmasos")


@dataclass
class LoraStats:
    loaded: list[str]  # adapters in slots, least recently used first
    slots: int
    slot_bytes: int
    loads: int  # adapters read into a slot since start
    evictions: int


def check_adapter(name: str, base_dir: Path) -> Path:
    """The store folder of adapter `name`, checked to be a LoRA adapter of the model in `base_dir`."""
    from llmasos.models.loader import adapter_base
    from llmasos.store import ModelStore

    try:
        folder = ModelStore().resolve(name, progress=False)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            f"no LoRA adapter {name!r} in the store ({exc}); `llmasos list` shows the adapters, "
            "`llmasos finetune BASE --method lora --name NAME` makes one"
        ) from None
    if not (folder / ADAPTER_CONFIG).is_file():
        raise InvalidRequestError(f"{name!r} is a model, not a LoRA adapter; name an adapter of this model")
    if adapter_base(folder).resolve() != base_dir.resolve():
        raise InvalidRequestError(f"{name!r} is a LoRA adapter of another base model, not of this one")
    return folder


class LoraSlots:
    def __init__(self, model: nn.Module, base_dir: Path, slots: int, max_rank: int):
        self.model, self.base_dir, self.num_slots, self.max_rank = model, base_dir, slots, max_rank
        self.ctx, self.projections = wrap_projections(model, slots, max_rank)
        if not self.projections:
            raise LLMasOSError("this model has no linear layers in its blocks for LoRA adapters")
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recently used first
        self.holds: Counter[int] = Counter()  # slot -> sequences holding it
        self.free = list(range(slots))[::-1]
        self.loads = self.evictions = 0

    @property
    def slot_bytes(self) -> int:
        return sum(p.slot_bytes() for p in self.projections.values())

    def check(self, name: str) -> None:
        """Adapter `name` can run here: an adapter of this model in the store, of rank within the slots'."""
        config = json.loads((check_adapter(name, self.base_dir) / ADAPTER_CONFIG).read_text())
        if config.get("r", 0) > self.max_rank:
            raise InvalidRequestError(
                f"the LoRA adapter {name!r} has rank {config['r']}, above this engine's max_lora_rank "
                f"{self.max_rank}: restart it with a max_lora_rank of at least {config['r']}"
            )

    def acquire(self, name: str) -> int | None:
        """The slot of adapter `name`, loading it if needed, held until `release`; None when every slot
        is held by running sequences (the caller waits for a release)."""
        slot = self.resident.get(name)
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                return None
            try:
                write_slot(
                    self.model, self.projections, slot, read_lora(check_adapter(name, self.base_dir)), name
                )
            except BaseException:
                self.free.append(slot)
                raise
            self.resident[name] = slot
            self.loads += 1
            log.info("LoRA adapter %s loaded into slot %d", name, slot)
        self.resident.move_to_end(name)
        self.holds[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.holds[slot] -= 1
        if self.holds[slot] <= 0:
            del self.holds[slot]

    def _take_slot(self) -> int | None:
        if self.free:
            return self.free.pop()
        victim = next((name for name, slot in self.resident.items() if not self.holds[slot]), None)
        if victim is None:
            return None
        self.evictions += 1
        log.info("LoRA adapter %s unloaded (least recently used)", victim)
        return self.resident.pop(victim)

    def stats(self) -> LoraStats:
        return LoraStats(list(self.resident), self.num_slots, self.slot_bytes, self.loads, self.evictions)
