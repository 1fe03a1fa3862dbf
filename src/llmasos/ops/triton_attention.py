"""Triton attention over the paged KV cache, for CUDA (bf16, fp16, fp32).

The cache layout is the runner's: k_cache/v_cache are [num_blocks, block_size, Hk, D] and token
`pos` of a sequence lives in block `block_table[pos // block_size]` at offset `pos % block_size`.
The kernels read K/V through the block tables in place, so no step ever gathers the context into
a contiguous copy. Three entry points, vLLM v1 style:

- `store_kv_triton`: scatter the new tokens' K/V into their cache slots (slot < 0 = padding).
- `decode_attention_triton`: one query token per sequence; split-K ("flash decoding"): each
  (sequence, KV head, split) program runs an online softmax over its share of the context for all
  the query heads of that KV head (GQA rides in the dot's M dimension), then a second small kernel
  merges the splits by their log-sum-exp. The grid depends only on tensor shapes, so it can be
  captured in a CUDA graph.
- `prefill_attention_triton`: a flat batch of several sequences' new tokens (cu_seqlens), each
  causal over its whole context, cached part included (prefix-cache hits, chunked prefill);
  flash-attention-2 tiling. The new tokens' K/V must be stored first: everything is read from the
  cache. A decode token is a 1-token prefill, so this kernel alone also serves mixed batches.

Softmax runs in fp32 in the log2 domain (exp2 with the scale folded into log2(e)); the dots take
the cache dtype (tensor cores for bf16/fp16), fp32 inputs are multiplied in full precision (no tf32).
Tile sizes and warps were chosen by compiling for sm_90 (no GPU at hand): at head_dim 128 in bf16
they are the largest that use no local memory (decode 190 registers, prefill 229); fp32 prefill
still spills (fp32 dots run on FMA units): a correctness path on CUDA, not a fast one.
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def triton_available(device: torch.device) -> bool:
    """Whether these kernels can run on `device`: CUDA with bf16 tensor cores (sm80+), or any device
    under TRITON_INTERPRET=1 (the CPU interpreter, for tests; it must be set before triton and this
    module are imported, since kernels are wrapped for the interpreter when they are defined)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32 would cost fp32 caches ~3 significant digits; for 16-bit inputs the choice is moot
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:  # padding row (e.g. a CUDA graph's unused batch slots)
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    dst = row + h[:, None] * stride_ch + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor):
    # the kernels index both caches with one set of strides, assume a unit stride over D everywhere,
    # and feed q and the cache to one tl.dot (which wants one dtype)
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(
            f"k/v caches need identical strides and a contiguous last dim, got {k_cache.stride()} "
            f"and {v_cache.stride()}"
        )
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q and out must be contiguous over head_dim")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the KV cache is {k_cache.dtype}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k_cache.shape[2]})")


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
):
    """k/v: [T, Hk, D] (any row/head strides, unit stride over D), slot_mapping: [T] int32/int64,
    slot = block_id * block_size + offset; rows with slot < 0 are skipped."""
    if k_cache.stride() != v_cache.stride() or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("store_kv_triton needs k/v caches with one layout and k, v contiguous over head_dim")
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


@triton.jit
def _kv_tile(table_ptr, pos, valid, head_offset, stride_cb, stride_cs, d, d_mask, BLOCK_SIZE: tl.constexpr):
    """Offsets (and mask) of the K/V rows at context positions `pos` of one sequence in the paged cache,
    table_ptr pointing at its block table, head_offset at its KV head."""
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    kv = (block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_offset)[:, None] + d[None, :]
    return kv, valid[:, None] & d_mask[None, :]


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores s (masked to -inf) and its values v into the running max m_i,
    sum l_i and output acc (flash attention's online softmax)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, context_lens_ptr, part_out_ptr, part_lse_ptr,
    scale_log2e,
    stride_qb, stride_qh, stride_bt,
    stride_cb, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split): the GROUP query heads of that KV head over a share of the context."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + b)
    # every sequence cuts its own context into NUM_SPLITS tile-aligned shares: the grid stays static
    split_len = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    g = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + g
    head_mask = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=head_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n in range(start, end, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)
        valid = pos < end
        kv, kv_mask = _kv_tile(tables_ptr + b * stride_bt, pos, valid, kv_head * stride_ch,
                               stride_cb, stride_cs, d, d_mask, BLOCK_SIZE)  # fmt: skip
        k = tl.load(k_cache_ptr + kv, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        s = tl.where(valid[None, :], s, float("-inf"))
        v = tl.load(v_cache_ptr + kv, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    # an empty split (short context) leaves lse = -inf, which the merge ignores; its output is never read
    part = (b * NUM_HEADS + heads) * NUM_SPLITS + split
    tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=head_mask)
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None],
             mask=head_mask[:, None] & d_mask[None, :])  # fmt: skip


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): the softmax-weighted sum of its splits' partial outputs."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    part = (b * NUM_HEADS + h) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + part, mask=s < NUM_SPLITS, other=float("-inf"))
    used = lse > float("-inf")
    # a sequence with no split used (context_len 0: a CUDA graph's padding row) comes out as zeros
    w = tl.where(used, tl.exp2(lse - tl.max(lse, 0)), 0.0)
    o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                mask=used[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # fmt: skip
    o = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence: enough (sequence, KV head, split) programs to fill every SM twice, but no
    split shorter than 256 tokens (a split's fixed cost) and at most 16 (the merge's cost). It
    depends only on shapes, so a CUDA graph captured for a batch size keeps a valid grid."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv(2 * sms, batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context, 256), 16))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D], one new token per sequence (any row/head strides, unit stride over D); its K/V
    must already be in the cache. block_tables: [B, W] int32, padded with anything (entries past a
    sequence's context are never read); context_lens: [B] int32, tokens to attend including the new
    one (0 for padding rows, which come out as zeros). Returns (or fills) out: [B, Hq, D] in q's
    dtype. num_splits defaults to `decode_num_splits` over the table width W * block_size; pass a
    fixed value when capturing a CUDA graph."""
    out = torch.empty_like(q) if out is None else out
    _check_inputs(q, k_cache, v_cache, out)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    group = num_heads // num_kv_heads
    part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16 on GPUs
        BLOCK_N=32 if q.element_size() <= 2 else 16, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(k_cache.dtype), num_warps=4, num_stages=2,
    )  # fmt: skip
    _decode_merge_kernel[(batch, num_heads)](
        part_out, part_lse, out,
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
    )  # fmt: skip
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
    scale_log2e,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query tile, sequence, query head). The sequence's new tokens are the last q_len of its
    seq_len positions, so query row i sits at position seq_len - q_len + i and sees keys 0..that."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:  # the grid covers the longest sequence; shorter ones stop here
        return
    seq_len = tl.load(seq_lens_ptr + b)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    q_pos = seq_len - q_len + rows
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
    kv_head = h // GROUP

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys past the tile's last query position are masked for every row: stop before them
    end = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)
    for n in range(0, end, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)
        valid = pos < end
        kv, kv_mask = _kv_tile(tables_ptr + b * stride_bt, pos, valid, kv_head * stride_ch,
                               stride_cb, stride_cs, d, d_mask, BLOCK_SIZE)  # fmt: skip
        k = tl.load(k_cache_ptr + kv, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        # key 0 is visible to every row (padding rows included), so no row's max stays -inf
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        v = tl.load(v_cache_ptr + kv, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    o = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])  # fmt: skip


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for B sequences' new tokens, packed in q: [T, Hq, D] (any row/head strides,
    unit stride over D); sequence b's rows are q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]].
    cu_seqlens_q: [B + 1] int32; seq_lens: [B] int32, each sequence's length after this step
    (cached context + new tokens); block_tables: [B, W] int32 covering seq_lens. The new tokens'
    K/V must already be in the cache. max_seqlen_q (a host int, the longest query run) sizes the
    grid. Returns (or fills) out: [T, Hq, D] in q's dtype; rows outside the runs are left as they are."""
    out = torch.empty_like(q) if out is None else out
    _check_inputs(q, k_cache, v_cache, out)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    batch = seq_lens.shape[0]
    if batch == 0 or max_seqlen_q == 0:
        return out
    block = 64 if q.element_size() <= 2 else 32
    _prefill_kernel[(triton.cdiv(max_seqlen_q, block), batch, num_heads)](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION=_dot_precision(k_cache.dtype), num_warps=8, num_stages=2,
    )  # fmt: skip
    return out
