"""Tensor parallelism (Megatron-style) for the decoder drivers: which rows of each matrix a rank holds.

A model split over N ranks keeps every activation between layers whole on every rank, and splits
the matrices: column-parallel layers (q/k/v, gate/up) give each rank a slice of the output
features, computed with no communication; row-parallel layers (the attention output and down
projections) take that slice as input and sum the partial products with one all-reduce. So a
decoder layer costs two all-reduces. Attention runs on each rank's own heads; KV heads are split
like the query heads, or replicated when there are fewer KV heads than ranks, and each rank's paged
KV cache holds only its own heads. The vocabulary is split too: the embedding looks up the ids in
its rows (zeros elsewhere, then an all-reduce), and the output head computes its slice of the
logits, gathered to rank 0, which samples.

Each parallel module slices the checkpoint's full tensors itself (`load_shard`), so the loader and
the drivers' weight-name mapping are the same for one rank or many. GGUF blocks are split the same
way (`shard_blocks`): a column-parallel rank keeps whole rows of blocks, a row-parallel rank whole
blocks of each row, where the split falls on the 32-weight block bounds (else that matrix runs its
float32 copy); the split vocabulary runs float32. With one rank the factories
return plain `nn.Linear` / `nn.Embedding`, so a single-device model is exactly what it was (and the
CPU decode stack, which takes only those types, still applies). Collectives go through
torch.distributed's default group (gloo on CPU, NCCL on CUDA), which kernel/executor.py sets up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.errors import UnsupportedModelError
from llmasos.ops.embedding import empty_embedding
from llmasos.ops.quant import BLOCK, LAYOUTS, QuantLinear, gguf_linear


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def min(self, value: int) -> int:
        """The smallest of every rank's `value` (ranks must agree on sizes such as the KV-cache blocks)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TensorParallel()


def per_rank(total: int, tp: TensorParallel, what: str) -> int:
    if total % tp.size:
        raise UnsupportedModelError(
            f"the model's {what} ({total}) do not split evenly across {tp.size} ranks; "
            f"choose a tensor_parallel_size that divides {total}"
        )
    return total // tp.size


def kv_heads_per_rank(num_kv_heads: int, tp: TensorParallel) -> int:
    """Each rank's KV heads: an equal share, or one replicated head when there are fewer heads than ranks."""
    if num_kv_heads >= tp.size:
        return per_rank(num_kv_heads, tp, "KV heads")
    if tp.size % num_kv_heads:
        raise UnsupportedModelError(
            f"{num_kv_heads} KV heads cannot be replicated evenly over {tp.size} ranks; "
            f"choose a tensor_parallel_size that is a multiple or a divisor of {num_kv_heads}"
        )
    return 1


@dataclass(frozen=True)
class Part:
    """The rows a rank holds of one part of a (packed) column-parallel matrix, in the checkpoint's part
    of `total` rows."""

    start: int
    size: int
    total: int


def column_part(total: int, tp: TensorParallel, what: str) -> Part:
    n = per_rank(total, tp, what)
    return Part(tp.rank * n, n, total)


def head_part(num_heads: int, head_dim: int, tp: TensorParallel, kv: bool = False) -> Part:
    """A rank's heads of a q (or, with `kv`, k or v) projection. KV heads replicated over ranks go to
    the ranks whose query heads use them: rank r holds KV head r * heads // ranks."""
    per = kv_heads_per_rank(num_heads, tp) if kv else per_rank(num_heads, tp, "attention heads")
    first = tp.rank * per if num_heads >= tp.size else tp.rank * num_heads // tp.size
    return Part(first * head_dim, per * head_dim, num_heads * head_dim)


class ColumnParallelLinear(nn.Linear):
    """Output features split across ranks, for each packed part (q/k/v, gate/up) alike: no communication."""

    def __init__(self, in_features: int, parts: list[Part], bias: bool):
        super().__init__(in_features, sum(p.size for p in parts), bias=bias)
        self.parts = parts

    def load_shard(self, leaf: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        if shard is not None or len(self.parts) == 1:  # one part (the driver packs q/k/v, gate/up)
            part = self.parts[shard or 0]
            return tensor.narrow(0, part.start, part.size)
        # a checkpoint that packs the parts itself (GPT-2's c_attn): this rank's rows of each
        pieces = tensor.split([p.total for p in self.parts])
        return torch.cat([x.narrow(0, p.start, p.size) for x, p in zip(pieces, self.parts)])


class RowParallelLinear(nn.Linear):
    """Input features split across ranks: partial products summed by one all-reduce (bias added once)."""

    def __init__(self, part: Part, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(part.size, out_features, bias=bias)
        self.part, self.tp = part, tp

    def load_shard(self, leaf: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        return tensor.narrow(1, self.part.start, self.part.size) if leaf == "weight" else tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight, self.bias if self.tp.rank == 0 else None))


class VocabParallelEmbedding(nn.Module):
    """The embedding's rows split across ranks (the last rank's padded with zeros when the vocabulary
    does not divide): each rank looks up the ids in its rows, zeros for the others, then an all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel):
        super().__init__()
        self.rows = -(-num_embeddings // tp.size)
        self.start, self.num_embeddings, self.tp = tp.rank * self.rows, num_embeddings, tp
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim), requires_grad=False)

    def load_shard(self, leaf: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        rows = tensor[self.start : self.start + self.rows]
        return torch.cat((rows, rows.new_zeros(self.rows - rows.shape[0], tensor.shape[1])))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        x = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine.unsqueeze(-1)
        return self.tp.all_reduce(x)


class ParallelLMHead(nn.Module):
    """The output head over this rank's vocabulary rows; the slices are gathered to rank 0, which
    alone gets the logits (the others get None: only rank 0 samples)."""

    def __init__(self, embed: VocabParallelEmbedding):
        super().__init__()
        self.weight, self.vocab_size, self.tp = embed.weight, embed.num_embeddings, embed.tp
        self.load_shard = embed.load_shard  # the same rows, tied or not

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        import torch.distributed as dist

        logits = F.linear(hidden, self.weight).contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.tp.size)] if self.tp.rank == 0 else None
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size] if parts is not None else None


class ColumnParallelQuantLinear(QuantLinear):
    """A column-parallel layer whose rows stay in GGUF blocks (its bias sliced as the float layer's)."""

    def __init__(self, layer: ColumnParallelLinear, packed: torch.Tensor, qtype: str, activation_bits: int):
        bias = layer.bias is not None
        super().__init__(packed, qtype, layer.in_features, layer.out_features, bias, activation_bits)
        self.parts = layer.parts

    load_shard = ColumnParallelLinear.load_shard


class RowParallelQuantLinear(QuantLinear):
    """A row-parallel layer whose blocks of each row stay in GGUF blocks: then the one all-reduce."""

    def __init__(self, layer: RowParallelLinear, packed: torch.Tensor, qtype: str, activation_bits: int):
        bias = layer.bias is not None
        super().__init__(packed, qtype, layer.in_features, layer.out_features, bias, activation_bits)
        self.part, self.tp = layer.part, layer.tp

    load_shard = RowParallelLinear.load_shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gguf_linear(x, self.packed, self.qtype, self.in_features, self.out_features, self.activation_bits)
        return self.tp.all_reduce(y + self.bias if self.bias is not None and self.tp.rank == 0 else y)


def shard_blocks(
    module: nn.Module, blocks: torch.Tensor, shard: int | None, qtype: str
) -> torch.Tensor | None:
    """This rank's part of a matrix's GGUF blocks ([rows, bytes]), or None where it cannot be split
    on block bounds (the matrix then runs its float32 copy)."""
    if isinstance(module, RowParallelLinear):
        start, size = module.part.start, module.part.size
        if start % BLOCK or size % BLOCK:
            return None
        block_bytes = LAYOUTS[qtype][1]
        return blocks[:, start // BLOCK * block_bytes : (start + size) // BLOCK * block_bytes]
    if isinstance(module, ColumnParallelLinear):
        return module.load_shard("weight", blocks, shard)
    return blocks


def quant_linear(layer: nn.Linear, packed: torch.Tensor, qtype: str, activation_bits: int) -> QuantLinear:
    """The GGUF-block module that replaces `layer` (split as it is)."""
    if isinstance(layer, ColumnParallelLinear):
        return ColumnParallelQuantLinear(layer, packed, qtype, activation_bits)
    if isinstance(layer, RowParallelLinear):
        return RowParallelQuantLinear(layer, packed, qtype, activation_bits)
    bias = layer.bias is not None
    return QuantLinear(packed, qtype, layer.in_features, layer.out_features, bias, activation_bits)


def column_linear(in_features: int, parts: list[Part], bias: bool, tp: TensorParallel) -> nn.Linear:
    if tp.size == 1:
        return nn.Linear(in_features, sum(p.size for p in parts), bias=bias)
    return ColumnParallelLinear(in_features, parts, bias)


def row_linear(part: Part, out_features: int, bias: bool, tp: TensorParallel) -> nn.Linear:
    if tp.size == 1:
        return nn.Linear(part.size, out_features, bias=bias)
    return RowParallelLinear(part, out_features, bias, tp)


def vocab_embedding(num_embeddings: int, embedding_dim: int, tp: TensorParallel) -> nn.Module:
    if tp.size == 1:
        return empty_embedding(num_embeddings, embedding_dim)
    return VocabParallelEmbedding(num_embeddings, embedding_dim, tp)


def lm_head(embed: nn.Module, hidden_size: int, vocab_size: int, tied: bool) -> nn.Module:
    """The output head: a plain Linear (tied to `embed` when `tied`) on one rank, else over embed's rows."""
    if isinstance(embed, VocabParallelEmbedding):
        head = ParallelLMHead(embed)
        if not tied:  # rows of its own, sliced alike
            head.weight = nn.Parameter(torch.empty_like(embed.weight), requires_grad=False)
        return head
    head = nn.Linear(hidden_size, vocab_size, bias=False)
    if tied:
        head.weight = embed.weight
    return head
