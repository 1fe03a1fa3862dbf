"""LoRA updates for a batch that mixes adapters, never merged into the base weights (Punica, S-LoRA).

Every adapter the engine holds sits in a slot of stacked tensors per projection: A as [slots, r, in]
and B transposed as [slots, r, out], scaled by alpha / r, zero-padded to the largest rank. A step
gives each row the slot of its request's adapter (-1: the base model alone), and the update
y += (x A^T) B^T is applied per row:

- on the CPU in float32, the C++ kernel (csrc/lora.cpp) takes every row of the step, decode and
  prefill alike, and every shard of the projection in one call (`lora_bgmv`), reading each used
  slot's A and B in place once;
- elsewhere `bgmv` (decode rows, one token each) gathers each row's A and B into a batched matmul,
  and `sgmv` (prefill segments, many rows of one request) runs one pair of matmuls per segment.

`bgmv_reference` is the plain per-row PyTorch code all of them are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmasos.ops.kernels import cpu_kernels


@dataclass
class LoraShard:
    """The slots of one packed shard of a projection (q, k or v of qkv; gate or up; a whole o/down)."""

    a: torch.Tensor  # [slots, rank, in_features]
    b: torch.Tensor  # [slots, rank, out_features of the shard]: B transposed, times alpha / r
    offset: int  # the shard's first column in the projection's output


@dataclass
class LoraBatch:
    """Which adapter each row of a step's flat batch uses."""

    # [T] int64 on the CPU: every row's slot, -1 for a row without an adapter (the C++ kernel's index)
    slots: torch.Tensor
    # [T] int64 on the model's device: the slot of each row that `bgmv` updates (decode rows), -1 for
    # the others; None without such rows
    row_slots: torch.Tensor | None = None
    # (first row, end row, slot) of each prefill chunk with an adapter, updated by `sgmv`
    segments: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class LoraContext:
    """The current step's `LoraBatch`, shared by every LoRA projection of a model (set per step)."""

    batch: LoraBatch | None = None


def bgmv_reference(y: torch.Tensor, x: torch.Tensor, shard: LoraShard, row_slots: torch.Tensor) -> None:
    """The plain code: y[t, cols] += x[t] A[s]^T B[s] for each row t with a slot s >= 0."""
    cols = slice(shard.offset, shard.offset + shard.b.shape[2])
    for t, slot in enumerate(row_slots.tolist()):
        if slot >= 0:
            y[t, cols] += (shard.a[slot] @ x[t]) @ shard.b[slot]


def bgmv(y: torch.Tensor, x: torch.Tensor, shard: LoraShard, row_slots: torch.Tensor) -> None:
    """Each row through its own adapter, in place in y (rows with slot -1 unchanged): a gathered
    batched matmul (the GPU, other dtypes), every row's A and B, then two bmm."""
    used = row_slots >= 0
    slots = row_slots.clamp(min=0)
    s = torch.bmm(shard.a[slots], x.unsqueeze(2)).squeeze(2) * used.unsqueeze(1).to(x.dtype)  # [T, r]
    y[:, shard.offset : shard.offset + shard.b.shape[2]] += torch.bmm(s.unsqueeze(1), shard.b[slots]).squeeze(
        1
    )


def sgmv(y: torch.Tensor, x: torch.Tensor, shard: LoraShard, segments: list[tuple[int, int, int]]) -> None:
    """Each segment of rows (one request's prefill chunk) through its adapter: two matmuls each."""
    cols = slice(shard.offset, shard.offset + shard.b.shape[2])
    for start, end, slot in segments:
        y[start:end, cols] += (x[start:end] @ shard.a[slot].T) @ shard.b[slot]


def kernel_shards(shards: list[LoraShard]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """A projection's shards as the C++ kernel takes them: the A's, the B's and the first columns."""
    return [s.a for s in shards], [s.b for s in shards], [s.offset for s in shards]


def add_lora(
    y: torch.Tensor, x: torch.Tensor, shards: list[LoraShard], batch: LoraBatch | None
) -> torch.Tensor:
    """y (the base projection's output) plus each row's adapter update, in place."""
    if batch is None:
        return y
    ops = cpu_kernels(x)
    if ops is not None and hasattr(ops, "lora_bgmv"):
        ops.lora_bgmv(y, x, *kernel_shards(shards), batch.slots)
        return y
    for shard in shards:
        if batch.row_slots is not None:
            bgmv(y, x, shard, batch.row_slots)
        if batch.segments:
            sgmv(y, x, shard, batch.segments)
    return y
