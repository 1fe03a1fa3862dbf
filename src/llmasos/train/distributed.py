"""Many processes, one model: torchrun's environment, DDP or FSDP2, and who writes what.

torchrun (`torchrun --nproc_per_node N -m llmasos ...`, multi-node with its usual rendezvous
flags) sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process and every helper
here is a no-op. Only rank 0 writes checkpoints, metrics and the store; every rank reads the
checkpoint it resumes from, so out_dir must be on a file system all nodes see.

FSDP2 checkpoints are gathered to full (unsharded) state dicts on rank 0 with
torch.distributed.checkpoint's get_model_state_dict/get_optimizer_state_dict, so a checkpoint is
the same file whatever the world size and mode; that costs rank 0 one model + optimizer of CPU
memory at save time, fine for the model sizes one node trains.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llmasos.errors import LLMasOSError


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); idempotent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_mode(mode: str, world_size: int) -> str:
    """'auto' is DDP under torchrun and plain otherwise."""
    if mode == "auto":
        return "ddp" if world_size > 1 else "none"
    if mode != "none" and world_size == 1:
        return "none"  # one process: DDP and FSDP would only add overhead
    return mode


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The module the loop calls: DDP around the model, or FSDP2 sharding it in place (each decoder
    layer, then the root, so a layer's parameters are gathered just before it runs)."""
    if mode == "none":
        return model
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layers = decoder_layers(model)
        if not layers:
            raise LLMasOSError(
                f"FSDP found no decoder layers in {type(model).__name__}; use --distributed ddp"
            )
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise LLMasOSError(f"unknown distributed mode '{mode}'; use ddp, fsdp or none")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers causal LM (peft-wrapped or not): the children of the
    first ModuleList named `layers` or `h`."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h"):
            return list(module)
    return []


def no_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync:
        return nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return nullcontext()


class _fsdp_no_sync(AbstractContextManager):
    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over the ranks (losses, token counts)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_object(obj: object) -> list:
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
