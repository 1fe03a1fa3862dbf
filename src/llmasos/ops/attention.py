"""Attention over the paged KV cache.

The runner describes one step's flat batch in an `AttentionMetadata`, built once per step and
shared by every layer: where each new token's K/V goes (`slot_mapping`), and for each sequence
which cache slots hold its context. Decoding sequences are attended in one batched call (one
gather and one SDPA per layer, whatever the batch size); prefill chunks one sequence at a time.
On CPU in float32 the K/V store and the decode attention are one fused call each that read the
cache in place (no gather); the PyTorch code is the reference and serves every other case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmasos.ops.kernels import cpu_kernels


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens (a prompt, a chunk of it, or a recomputation)."""

    start: int  # its rows in the flat batch: [start, end)
    end: int
    kv_slots: (
        torch.Tensor | None
    )  # [context_len] cache slots of its whole context; None if it has no cached part
    mask: torch.Tensor | None  # [q, context_len] bool, True = may attend; None when plain causal


@dataclass
class TritonBatch:
    """The step as the Triton kernels read it: each sequence's run of new rows, its length after
    the step and its block table (int32, padded), so attention reads K/V in place, no gather."""

    block_tables: torch.Tensor  # [B, W]
    cu_seqlens_q: torch.Tensor  # [B + 1]
    seq_lens: torch.Tensor  # [B]
    max_seqlen_q: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    decode_rows: torch.Tensor | None = None  # [B] rows of the flat batch that are single decode tokens
    decode_kv_slots: torch.Tensor | None = None  # [B, L] context slots, padded
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] bool, False on padding; None if none
    prefills: list[PrefillChunk] = field(default_factory=list)
    triton: TritonBatch | None = None  # set when the runner uses the Triton backend


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
):
    """Store the new tokens' K/V; caches are [num_blocks, block_size, Hk, D], slots index blocks x offsets."""
    ops = cpu_kernels(k)
    dense_rows = k.stride(2) == v.stride(2) == 1 and k.stride(1) == v.stride(1) == k.shape[2]
    if ops is not None and dense_rows and k_cache.dtype == torch.float32:
        ops.store_kv(k, v, k_cache, v_cache, slots)
        return
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, Hk, D] for the new tokens -> [T, Hq, D]. Writes k/v into the cache first."""
    if md.triton is not None:  # one kernel for the whole flat batch: decode rows are 1-token runs
        from llmasos.ops import triton_attention as ta

        t = md.triton
        ta.store_kv_triton(k, v, k_cache, v_cache, md.slot_mapping)
        return ta.prefill_attention_triton(
            q, k_cache, v_cache, t.block_tables, t.cu_seqlens_q, t.seq_lens, t.max_seqlen_q, scale
        )
    write_kv(k, v, k_cache, v_cache, md.slot_mapping)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    ops = cpu_kernels(q) if q.stride(-1) == 1 and head_dim % 8 == 0 else None
    if ops is not None and not md.prefills and md.decode_rows is not None and k_cache.dtype == torch.float32:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # a decode-only step: one call
        slots, mask = md.decode_kv_slots, md.decode_mask
        ops.decode_attention(q, k_cache, v_cache, md.decode_rows, slots, mask, scale, out)
        return out
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    gqa = q.shape[1] != num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for chunk in md.prefills:
        qs = q[chunk.start : chunk.end].transpose(0, 1)  # [Hq, q, D]
        if chunk.kv_slots is None:
            ks, vs = k[chunk.start : chunk.end], v[chunk.start : chunk.end]
        else:
            ks, vs = flat_k[chunk.kv_slots], flat_v[chunk.kv_slots]
        o = F.scaled_dot_product_attention(
            qs,
            ks.transpose(0, 1),
            vs.transpose(0, 1),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None and qs.shape[1] > 1,
            scale=scale,
            enable_gqa=gqa,
        )
        out[chunk.start : chunk.end] = o.transpose(0, 1)
    if md.decode_rows is None:
        return out
    if ops is not None and k_cache.dtype == torch.float32:
        slots, mask = md.decode_kv_slots, md.decode_mask
        ops.decode_attention(q, k_cache, v_cache, md.decode_rows, slots, mask, scale, out)
    else:
        qd = q[md.decode_rows].unsqueeze(2)  # [B, Hq, 1, D]
        kd = flat_k[md.decode_kv_slots].transpose(1, 2)  # [B, Hk, L, D]
        vd = flat_v[md.decode_kv_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=md.decode_mask, scale=scale, enable_gqa=gqa)
        out[md.decode_rows] = o.squeeze(2)
    return out
