"""LoRA adapters on a loaded driver without merging them: peft's files read, projections wrapped.

`read_lora` reads a peft LoRA folder (as `llmasos finetune --method lora` stores it) into its A and B
matrices per checkpoint module; `wrap_projections` puts a `LoraProjection` around every linear layer
of a decoder's blocks, with room for `slots` adapters of rank up to `max_rank`, and `write_slot`
copies an adapter into one slot. Which adapter each row uses is the step's `LoraBatch`
(ops/lora.py), so one batch serves many adapters over one copy of the base weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmasos.errors import UnsupportedModelError
from llmasos.ops.lora import LoraContext, LoraShard, add_lora
from llmasos.ops.quant import QuantLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraWeights:
    """A peft LoRA adapter: per checkpoint module name (e.g. model.layers.0.self_attn.q_proj), (A, B)."""

    rank: int
    scaling: float  # alpha / r (alpha / sqrt(r) with rsLoRA)
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]  # A [r, in], B [out, r]


def read_lora(adapter_dir: Path) -> LoraWeights:
    """The adapter's matrices; other peft methods and LoRA variants are refused with what to do instead."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    unsupported = [
        key
        for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")
        if config.get(key)
    ]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        kind = " with ".join([config.get("peft_type", "LORA"), *unsupported])
        raise UnsupportedModelError(
            f"{adapter_dir.name}: only plain LoRA adapters are applied by the kernel (this one is {kind}); "
            "merge it into a full model instead (`llmasos finetune ... --merge`)"
        )
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    matrices = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        if config.get("fan_in_fan_out"):  # GPT-2's Conv1D layout: stored transposed
            a, b = b.T, a.T
        matrices[module] = (a.float(), b.float())
    return LoraWeights(rank, scaling, matrices)


class LoraProjection(nn.Module):
    """A linear layer (nn.Linear or GGUF-block QuantLinear) plus the update of each row's adapter."""

    def __init__(self, base: nn.Module, shard_sizes: list[int], slots: int, max_rank: int, ctx: LoraContext):
        super().__init__()
        self.base, self.ctx = base, ctx
        device, offset = _device(base), 0
        self.shards: list[LoraShard] = []
        for size in shard_sizes:
            a = torch.zeros(slots, max_rank, base.in_features, device=device)
            b = torch.zeros(slots, max_rank, size, device=device)
            self.shards.append(LoraShard(a.to(_dtype(base)), b.to(_dtype(base)), offset))
            offset += size

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_lora(self.base(x), x, self.shards, self.ctx.batch)

    def slot_bytes(self) -> int:
        return sum((s.a[0].numel() + s.b[0].numel()) * s.a.element_size() for s in self.shards)


def _device(module: nn.Module) -> torch.device:
    return next(t for t in [*module.parameters(), *module.buffers()]).device


def _dtype(module: nn.Module) -> torch.dtype:
    return torch.float32 if isinstance(module, QuantLinear) else module.weight.dtype


def wrap_projections(
    model: nn.Module, slots: int, max_rank: int
) -> tuple[LoraContext, dict[str, LoraProjection]]:
    """Wrap every linear layer of the decoder blocks; -> (the context the runner sets per step, the
    projections by parameter name prefix, e.g. layers.0.self_attn.qkv_proj)."""
    ctx, wrapped = LoraContext(), {}
    for name, module in list(model.layers.named_modules(prefix="layers")):
        if type(module) not in (nn.Linear, QuantLinear):
            continue
        sizes = model.shard_sizes(f"{name}.weight") or [module.out_features]
        wrapped[name] = LoraProjection(module, sizes, slots, max_rank, ctx)
        model.set_submodule(name, wrapped[name])
    return ctx, wrapped


def write_slot(
    model: nn.Module, projections: dict[str, LoraProjection], slot: int, adapter: LoraWeights, name: str
) -> None:
    """Copy an adapter into a slot of every projection (zeros where it adapts nothing), B scaled."""
    max_rank = next(iter(projections.values())).shards[0].a.shape[1]
    if adapter.rank > max_rank:
        raise UnsupportedModelError(
            f"adapter {name} has rank {adapter.rank}, above max_lora_rank {max_rank}; "
            f"serve with --max-lora-rank {adapter.rank} or more"
        )
    for projection in projections.values():
        for shard in projection.shards:
            shard.a[slot].zero_()
            shard.b[slot].zero_()
    for module, (a, b) in adapter.matrices.items():
        mapped = model.map_weight(f"{module}.weight", a)
        target = mapped and projections.get(mapped[0].removesuffix(".weight"))
        if target is None:
            raise UnsupportedModelError(
                f"adapter {name} adapts {module}, which the base model has no linear layer for; "
                "it was trained on another model"
            )
        shard = target.shards[mapped[1] or 0]
        if a.shape[1] != shard.a.shape[2] or b.shape[0] != shard.b.shape[2]:
            raise UnsupportedModelError(
                f"adapter {name}: {module} is {b.shape[0]}x{a.shape[1]}, the base model's is "
                f"{shard.b.shape[2]}x{shard.a.shape[2]}; it was trained on another model"
            )
        shard.a[slot, : adapter.rank] = a
        shard.b[slot, : adapter.rank] = (b * adapter.scaling).T
