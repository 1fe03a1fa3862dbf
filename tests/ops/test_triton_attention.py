"""Triton paged-attention kernels against plain PyTorch (gather by slots + SDPA).

Without a GPU the kernels run in Triton's CPU interpreter, which is chosen when a kernel is defined
(triton's own library included) and consulted again by imports triton makes at launch, so
TRITON_INTERPRET is set while triton and the kernel module are imported and during this module's
tests, and restored otherwise: no other test, and no dispatcher asking `triton_available`, sees it.
bf16 runs on GPU only: the interpreter's tl.dot multiplies bf16 as raw uint16 bits (triton 3.9);
fp16 takes the same path through the kernels.
"""

import importlib
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _import_kernels():
    if ON_GPU:
        pytest.importorskip("triton")
        return importlib.import_module("llmasos.ops.triton_attention")
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        # reload: code an earlier test ran may have imported the module without the interpreter
        return importlib.reload(importlib.import_module("llmasos.ops.triton_attention"))
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


ta = _import_kernels()
# the interpreter runs the kernels in numpy, which warns at the -inf/NaN that empty splits and padding
# rows produce by design (and never let through)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
HEADS = [(4, 2, 64), (6, 2, 64), (2, 2, 128)]  # (Hq, Hk, D): GQA, GQA with a group of 3, MHA


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _paged_cache(context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype):
    """Random K/V for each sequence's context, stored through shuffled block tables; every other slot
    is NaN, so a kernel that reads one slot too many fails. Tables are padded with an out-of-range id."""
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 3
    ids = list(range(num_blocks))
    random.shuffle(ids)
    width = max(needed)
    tables, slots = [], []
    for n, blocks in zip(context_lens, needed):
        table = [ids.pop() for _ in range(blocks)]
        tables.append(table + [num_blocks + 1000] * (width - blocks))
        pos = torch.arange(n)
        slots.append(torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    for s in slots:
        for cache in (k_cache, v_cache):
            values = torch.randn(len(s), num_kv_heads, head_dim).to(DEVICE, dtype)
            cache.view(-1, num_kv_heads, head_dim)[s.to(DEVICE)] = values
    block_tables = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, block_tables, slots


def _strided_q(num_tokens: int, num_heads: int, head_dim: int, dtype) -> torch.Tensor:
    """q as the model hands it over: a view into a packed qkv row, not contiguous across heads/rows."""
    qkv = torch.randn(num_tokens, num_heads + 2, head_dim).to(DEVICE, dtype)
    return qkv[:, :num_heads]


def _reference(q, k_cache, v_cache, slots, scale):
    """q: [Lq, Hq, D] for the last Lq positions of a context at `slots`; causal; computed in fp32."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots.to(DEVICE)].float().transpose(0, 1)
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots.to(DEVICE)].float().transpose(0, 1)
    q_len, n = q.shape[0], len(slots)
    mask = torch.arange(n, device=DEVICE)[None, :] <= torch.arange(n - q_len, n, device=DEVICE)[:, None]
    o = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != num_kv_heads
    )
    return o.transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # no tl.dot: bf16 too
def test_store_kv_writes_each_token_to_its_slot(dtype):
    num_blocks, block_size, num_kv_heads, head_dim = 6, 16, 2, 64
    kv = torch.randn(10, 3 * num_kv_heads, head_dim).to(DEVICE, dtype)  # packed like qkv: strided views
    k, v = kv[:, num_kv_heads : 2 * num_kv_heads], kv[:, 2 * num_kv_heads :]
    slots = torch.randperm(num_blocks * block_size)[:10]
    slots[3] = -1  # a padding row writes nothing
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    ta.store_kv_triton(k, v, k_cache, v_cache, slots.to(DEVICE))
    keep = slots >= 0
    expect_k, expect_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    expect_k.view(-1, num_kv_heads, head_dim)[slots[keep].to(DEVICE)] = k[keep.to(DEVICE)]
    expect_v.view(-1, num_kv_heads, head_dim)[slots[keep].to(DEVICE)] = v[keep.to(DEVICE)]
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(dtype, heads, block_size):
    random.seed(0)
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim = heads
    context_lens = [1, block_size - 1, block_size, block_size + 1, 2 * block_size + 37]
    k_cache, v_cache, tables, slots = _paged_cache(context_lens, num_kv_heads, head_dim, block_size, dtype)
    q = _strided_q(len(context_lens), num_heads, head_dim, dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    scale, tol = head_dim**-0.5, TOLERANCE[dtype]
    expect = torch.cat([_reference(q[b : b + 1], k_cache, v_cache, s, scale) for b, s in enumerate(slots)])
    # 3 splits: the longest context spans all three, shorter ones leave splits empty (one split is the
    # default for these shapes, tested below)
    out = ta.decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, num_splits=3)
    torch.testing.assert_close(out.float(), expect, atol=tol, rtol=tol)


def test_decode_fills_a_slice_of_out_and_zeroes_padding_rows():
    """The runner's shape: out is a slice of a larger buffer; a CUDA graph's padding rows have length 0."""
    random.seed(1)
    torch.manual_seed(1)
    k_cache, v_cache, block_tables, slots = _paged_cache([40, 1, 90], 2, 64, 16, torch.float32)
    q = _strided_q(3, 4, 64, torch.float32)
    lens = torch.tensor([40, 0, 90], dtype=torch.int32, device=DEVICE)
    buffer = torch.full((5, 4, 64), 7.0, device=DEVICE)
    ta.decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 0.125, out=buffer[1:4])
    assert torch.equal(buffer[[0, 4]], torch.full((2, 4, 64), 7.0, device=DEVICE))
    assert torch.equal(buffer[2], torch.zeros(4, 64, device=DEVICE))
    for row, b in ((1, 0), (3, 2)):
        expect = _reference(q[b : b + 1], k_cache, v_cache, slots[b], 0.125)[0]
        torch.testing.assert_close(buffer[row], expect)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_matches_reference(dtype, heads, block_size):
    random.seed(2)
    torch.manual_seed(2)
    num_heads, num_kv_heads, head_dim = heads
    # (cached, new): a fresh prompt across a block edge, a prefix hit ending on a block edge, a decode
    # token, a chunk of a long prompt spanning several query and key tiles, a 1-token prompt
    runs = [(0, block_size + 1), (block_size, 5), (3, 1), (2 * block_size + 7, 70), (0, 1)]
    context_lens = [cached + new for cached, new in runs]
    k_cache, v_cache, tables, slots = _paged_cache(context_lens, num_kv_heads, head_dim, block_size, dtype)
    q_lens = [new for _, new in runs]
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    q = _strided_q(sum(q_lens), num_heads, head_dim, dtype)
    scale, tol = head_dim**-0.5, TOLERANCE[dtype]
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    out = ta.prefill_attention_triton(q, k_cache, v_cache, tables, cu, lens, max(q_lens), scale)
    for b, s in enumerate(slots):
        start, end = cu[b].item(), cu[b + 1].item()
        expect = _reference(q[start:end], k_cache, v_cache, s, scale)
        torch.testing.assert_close(out[start:end].float(), expect, atol=tol, rtol=tol, msg=f"seq {b}")


def test_store_then_prefill_then_decode_is_plain_causal_attention():
    """The runner's sequence of calls for one prompt and its next token, against SDPA on dense K/V."""
    torch.manual_seed(3)
    block_size, num_heads, num_kv_heads, head_dim, n = 16, 4, 2, 64, 37
    q = torch.randn(n + 1, num_heads, head_dim, device=DEVICE)
    k, v = torch.randn(2, n + 1, num_kv_heads, head_dim, device=DEVICE)
    table = torch.tensor([[5, 0, 3]], dtype=torch.int32, device=DEVICE)
    pos = torch.arange(n + 1, device=DEVICE)
    slot_mapping = table[0, pos // block_size].long() * block_size + pos % block_size
    k_cache = torch.full((6, block_size, num_kv_heads, head_dim), float("nan"), device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    ta.store_kv_triton(k[:n], v[:n], k_cache, v_cache, slot_mapping[:n])
    cu = torch.tensor([0, n], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    prefill = ta.prefill_attention_triton(q[:n], k_cache, v_cache, table, cu, lens, n, 0.125)
    ta.store_kv_triton(k[n:], v[n:], k_cache, v_cache, slot_mapping[n:])
    decode = ta.decode_attention_triton(q[n:], k_cache, v_cache, table, lens + 1, 0.125, num_splits=2)
    expect = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.125, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(torch.cat([prefill, decode]), expect, atol=2e-5, rtol=2e-5)


def test_triton_available(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ta.triton_available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ta.triton_available(torch.device("cpu"))
    if ON_GPU:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert ta.triton_available(DEVICE) == (torch.cuda.get_device_capability() >= (8, 0))


def test_decode_num_splits_depend_only_on_shapes():
    assert ta.decode_num_splits(1, 8, 100, torch.device("cpu")) == 1  # short context: one split
    assert ta.decode_num_splits(256, 8, 40960, torch.device("cpu")) == 1  # big batch fills the GPU alone
    if ON_GPU:
        assert ta.decode_num_splits(1, 8, 40960, DEVICE) == 16
