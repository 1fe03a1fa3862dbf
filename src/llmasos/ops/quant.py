"""Weights kept in GGUF's block-quantized layouts (Q8_0, Q4_0, Q4_1), used without dequantizing them.

On CPU a decode step is bound by reading the weights; kept in their GGUF blocks they are 4-7x
smaller than float32. `QuantLinear` holds them repacked 8 rows at a time (`pack_blocks`, the same
bytes in the order the C++ kernel in `csrc/gguf_linear.cpp` reads them: x86 AVX2 or VNNI, ARM
NEON) and runs that kernel; `dequantize_reference` is the plain-PyTorch definition of each layout
(gguf-py's arithmetic), which the tests compare the kernel against and which serves wherever the
kernel cannot be built.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmasos.ops.kernels import VNNI_ISAS, cpu_isa, kernels

BLOCK = 32
# layout name -> (ggml type id, bytes per block of 32 weights)
LAYOUTS = {"Q4_0": (2, 18), "Q4_1": (3, 20), "Q8_0": (8, 34)}
# Above this many rows BLAS on dequantized float rows outruns the AVX2 build's kernel with 16-bit
# activations (measured on the embedded model's layers, a Zen 1 EPYC: kernel 23 GMAC/s at any size, BLAS
# 21 at 64 rows, 25 at 128, 31 at 512). The VNNI builds outrun BLAS at every size (a Zen 5 EPYC, 2 cores:
# 16-bit kernel 307-313 GMAC/s at 256 and 1,024 rows, BLAS 81-99), and with 8-bit activations every
# build does, so these take all the rows, prompts included, as llama.cpp does.
MAX_KERNEL_ROWS = 64


@functools.cache  # on the path of every matmul; the build is chosen once a process (kernels())
def kernel_row_limit(activation_bits: int) -> int:
    """The most rows of one matmul the integer kernel takes; more go to BLAS on float rows."""
    if activation_bits == 8 or cpu_isa() in VNNI_ISAS:
        return 2**62
    return MAX_KERNEL_ROWS


PACK_ROWS = 8  # rows interleaved in the packed layout


def _header_bytes(qtype: str) -> int:
    """The bytes of float16 scales that open a GGUF block: d, and Q4_1's minimum m."""
    return 4 if qtype == "Q4_1" else 2


def pack_blocks(blocks: torch.Tensor | list[torch.Tensor], qtype: str) -> torch.Tensor:
    """[N, bytes] GGUF blocks -> [ceil(N / 8), bytes * 8] in the kernel's layout: rows in groups of 8
    (the last padded with zero blocks), each group block by block; a block's record is the 8 rows'
    d (then m), then their quants in chunks of 4 bytes, row by row. Only the order of bytes changes.

    A list packs its tensors' rows one after the other (q, k and v into one matrix) without joining
    them first. Each byte is copied once, straight into the result: a load holds the model plus one
    tensor, and on a busy machine every extra pass over the weights is another parallel region that
    waits for a descheduled thread."""
    parts = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks]
    if any(part.shape[0] % PACK_ROWS for part in parts[:-1]):  # a group would straddle two parts
        parts = [torch.cat(parts)]
    rows, row_bytes = sum(part.shape[0] for part in parts), parts[0].shape[1]
    out = parts[0].new_empty(-(-rows // PACK_ROWS), row_bytes * PACK_ROWS)
    group = 0
    for part in parts:
        whole = part.shape[0] // PACK_ROWS
        _pack_groups(part[: whole * PACK_ROWS], out[group : group + whole], qtype)
        group += whole
    if group < out.shape[0]:  # the last rows, padded with zero blocks to a group of 8
        tail = parts[-1][whole * PACK_ROWS :]
        padded = torch.cat([tail, tail.new_zeros((PACK_ROWS - tail.shape[0], row_bytes))])
        _pack_groups(padded, out[group:], qtype)
    return out


def _pack_groups(blocks: torch.Tensor, out: torch.Tensor, qtype: str) -> None:
    """`pack_blocks` of [8 * G, bytes] blocks into out, [G, bytes * 8]: two strided copies in units of
    2 bytes (every layout's scales and 4-byte quant chunks start at an even byte of an even-sized block).

    numpy copies, on one thread: torch would split each copy over its threads, and on a busy machine
    every such parallel region waits for a descheduled thread (a load took 4 s instead of 0.3 s)."""
    groups = out.shape[0]
    if groups == 0:
        return
    size, header = LAYOUTS[qtype][1], _header_bytes(qtype)
    nblocks, scales, chunks = blocks.shape[1] // size, header // 2, (size - header) // 4
    src = _units(blocks.contiguous())
    src = src.reshape(groups, PACK_ROWS, nblocks, size // 2, src.shape[-1])
    dst = _units(out).reshape(groups, nblocks, PACK_ROWS * size // 2, -1)
    np.copyto(
        dst[..., : PACK_ROWS * scales, :].reshape(groups, nblocks, scales, PACK_ROWS, -1),
        src[..., :scales, :].transpose(0, 2, 3, 1, 4),
    )
    np.copyto(
        dst[..., PACK_ROWS * scales :, :].reshape(groups, nblocks, chunks, PACK_ROWS, 2, -1),
        src[..., scales:, :].reshape(groups, PACK_ROWS, nblocks, chunks, 2, -1).transpose(0, 2, 3, 1, 4, 5),
    )


def _units(t: torch.Tensor) -> np.ndarray:
    """[..., bytes] as a numpy view [..., bytes / 2, u] of units of 2 bytes: bytes as int16 (u = 1, so
    that a copy moves 2 bytes at a time), or pairs of elements of another dtype (u = 2: `_unpack_index`
    packs the bytes' positions). Splitting the last axis keeps numpy's reshapes views of `t`."""
    units = t.view(torch.int16).unsqueeze(-1) if t.dtype == torch.uint8 else t.unflatten(-1, (-1, 2))
    return units.numpy()


@functools.cache
def _unpack_index(qtype: str, in_features: int) -> torch.Tensor:
    """[8, row bytes]: where each byte of a group's 8 GGUF rows sits in its packed records, found by
    packing the bytes' own positions (so it can never disagree with `pack_blocks`)."""
    row_bytes = in_features // BLOCK * LAYOUTS[qtype][1]
    positions = pack_blocks(torch.arange(PACK_ROWS * row_bytes).view(PACK_ROWS, row_bytes), qtype)
    return torch.argsort(positions.view(-1)).view(PACK_ROWS, row_bytes)


def unpack_blocks(packed: torch.Tensor, qtype: str, in_features: int, out_features: int) -> torch.Tensor:
    """The inverse of `pack_blocks`: [out_features, bytes] GGUF blocks."""
    index = _unpack_index(qtype, in_features).to(packed.device)
    return packed[:, index.view(-1)].view(-1, index.shape[1])[:out_features]


def dequantize_reference(blocks: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """[N, bytes] uint8 blocks -> [N, in_features] float32, exactly as gguf-py computes it."""
    n = blocks.shape[0]
    b = blocks.reshape(n, in_features // BLOCK, LAYOUTS[qtype][1])
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    if qtype == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(n, in_features)
    nibbles = b[..., 4:] if qtype == "Q4_1" else b[..., 2:]
    q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).to(torch.int32)
    if qtype == "Q4_0":
        return (d * (q - 8).float()).reshape(n, in_features)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    return (d * q.float() + m).reshape(n, in_features)


def quantize_blocks(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """[N, K] float -> [N, bytes] uint8 blocks in the GGUF layout, as llama.cpp's reference quantizers
    make them (round to nearest; Q8_0 symmetric over the block's absmax, Q4_1 over its min..max).
    The scale is rounded to float16 before the values are, so each value is within half a step of
    what `dequantize_reference` returns."""
    if qtype not in ("Q8_0", "Q4_1"):
        raise ValueError(f"cannot quantize to {qtype}; Q8_0 and Q4_1 are supported")
    n, k = weight.shape
    x = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if qtype == "Q8_0":
        d = (x.abs().amax(-1, keepdim=True) / 127).half()
        q = torch.round(x / d.float().clamp_min(1e-30)).clamp(-127, 127).to(torch.int8)
        parts = [d.view(torch.uint8), q.view(torch.uint8)]
    else:
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d, m = ((high - low) / 15).half(), low.half()
        q = torch.round((x - m.float()) / d.float().clamp_min(1e-30)).clamp(0, 15).to(torch.uint8)
        nibbles = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
        parts = [d.view(torch.uint8), m.view(torch.uint8), nibbles]
    return torch.cat(parts, dim=-1).reshape(n, -1).contiguous()


def gguf_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    qtype: str,
    in_features: int,
    out_features: int,
    activation_bits: int = 16,
) -> torch.Tensor:
    """x @ W^T for W packed by `pack_blocks`; the kernel rounds x per block of 32 to integers of
    `activation_bits` (16: logits within ~1e-4 of float; 8: llama.cpp's, ~2x the rows a second)."""
    ops = kernels()
    if ops is None or x.device.type != "cpu" or x.dtype != torch.float32:
        weight = dequantize_reference(
            unpack_blocks(packed, qtype, in_features, out_features), qtype, in_features
        )
        return F.linear(x, weight.to(x.dtype))
    if x.shape[0] > kernel_row_limit(activation_bits):
        return F.linear(x, ops.gguf_dequantize(packed, LAYOUTS[qtype][0], in_features, out_features))
    return ops.gguf_linear(x, packed, LAYOUTS[qtype][0], in_features, out_features, activation_bits)


class QuantLinear(nn.Module):
    """nn.Linear whose weight stays in GGUF blocks, packed by `pack_blocks` (a buffer, which a tied
    output head shares with its QuantEmbedding; only the bias is a parameter)."""

    def __init__(
        self,
        packed: torch.Tensor,
        qtype: str,
        in_features: int,
        out_features: int,
        bias: bool = False,
        activation_bits: int = 16,
    ):
        super().__init__()
        self.register_buffer("packed", packed, persistent=False)
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.activation_bits = activation_bits
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.qtype, self.in_features, self.out_features, self.activation_bits)
        if x.dim() == 2:  # the models' flat batch: no reshapes (each is a dispatch on the decode path)
            y = gguf_linear(x, self.packed, *shape)
        else:
            y = gguf_linear(x.reshape(-1, self.in_features), self.packed, *shape)
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class QuantEmbedding(nn.Module):
    """nn.Embedding over GGUF blocks packed by `pack_blocks`: only the looked-up rows are unpacked
    and dequantized."""

    def __init__(self, packed: torch.Tensor, qtype: str, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("packed", packed, persistent=False)
        self.qtype, self.num_embeddings, self.embedding_dim = qtype, num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        index = _unpack_index(self.qtype, self.embedding_dim).to(ids.device)
        rows = self.packed[flat // PACK_ROWS].gather(1, index[flat % PACK_ROWS])  # each id's GGUF row
        return dequantize_reference(rows, self.qtype, self.embedding_dim).reshape(*ids.shape, -1)
