"""LoRA adapters as models of the server (`serve --enable-lora`).

A request names `base:adapter`, or the adapter's store name alone; both run on the base model's
engine with the adapter applied per row (kernel/lora.py), so many adapters share one copy of the
base weights and one batch. `/v1/models` lists each adapter of a served base with that base as its
`parent`, as vLLM does. Without --enable-lora an adapter's store name loads it merged, as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llmasos.errors import LLMasOSError
from llmasos.serve.errors import APIError


@dataclass
class ModelName:
    """What a request's `model` names: the model whose engine runs it, and the adapter, if any."""

    base: str
    lora: str | None = None


def adapter_parent(name: str) -> str | None:
    """The base model a store adapter names (peft's base_model_name_or_path); None for anything else."""
    from llmasos.models.lora import ADAPTER_CONFIG
    from llmasos.store import ModelStore

    store = ModelStore()
    try:
        if ADAPTER_CONFIG not in store.get(name).files:
            return None
        config = json.loads((store.path(name) / ADAPTER_CONFIG).read_text())
    except LLMasOSError:
        return None
    return config.get("base_model_name_or_path")


def split_model(name: str, enable_lora: bool) -> ModelName:
    """`base:adapter` -> (base, adapter); an adapter's store name -> (its base, it) with LoRA serving on."""
    if ":" in name:
        base, _, lora = name.partition(":")
        if not enable_lora:
            raise APIError(
                400,
                f"{name!r} names the LoRA adapter {lora!r} of {base!r}, but this server runs without "
                "adapters: start it with `llmasos serve --enable-lora`",
                param="model",
                code="model_not_supported",
            )
        return ModelName(base, lora)
    parent = adapter_parent(name) if enable_lora else None
    return ModelName(parent, name) if parent else ModelName(name)


def adapters_of(bases: list[str]) -> dict[str, str]:
    """The store's adapters of these base models: adapter name -> its base."""
    from llmasos.store import ModelStore

    wanted = set(bases)
    found = {entry.name: adapter_parent(entry.name) for entry in ModelStore().list()}
    return {name: parent for name, parent in found.items() if parent in wanted}
