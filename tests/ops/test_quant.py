"""The CPU kernels against their plain-PyTorch references: the GGUF block matmul (8- and 16-bit
activations) over the packed layout, and dequantization against gguf-py, and the fused per-layer ops
against the torch code they replace on CPU."""

import functools

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from llmasos.ops import quant
from llmasos.ops.quant import (
    LAYOUTS,
    QuantEmbedding,
    QuantLinear,
    dequantize_reference,
    pack_blocks,
    unpack_blocks,
)

pytestmark = pytest.mark.skipif(
    quant.kernels() is None, reason="the CPU kernels need AVX2 and a C++ compiler"
)


def make_blocks(layout, rows=96, cols=320, seed=0):
    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = quantize(weights, GGMLQuantizationType[layout])
    return torch.from_numpy(blocks), torch.from_numpy(dequantize(blocks, GGMLQuantizationType[layout]).copy())


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [96, 97])  # 97: the last group of 8 rows is padded
def test_packing_reorders_bytes_only_and_the_kernel_dequantizes_exactly_like_gguf_py(layout, rows):
    blocks, expected = make_blocks(layout, rows=rows)
    packed = pack_blocks(blocks, layout)
    assert packed.shape[0] == (rows + 7) // 8 and packed.numel() == packed.shape[0] * 8 * blocks.shape[1]
    assert torch.equal(unpack_blocks(packed, layout, 320, rows), blocks)
    assert torch.equal(dequantize_reference(blocks, layout, 320), expected)
    assert torch.equal(quant.kernels().gguf_dequantize(packed, LAYOUTS[layout][0], 320, rows), expected)


def rounded_activations(x, bits):
    """x as the kernel rounds it: per block of 32, to a multiple of max|x_block| / qmax, ties to even
    (16 bits: 255 * 127 + 127, the largest of two 8-bit planes hi * 255 + lo)."""
    qmax = 127.0 if bits == 8 else 255.0 * 127 + 127
    blocks = x.reshape(x.shape[0], -1, 32)
    largest = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(
        largest > 0, torch.full_like(largest, qmax) / largest, 0
    )  # IEEE division, as the kernel
    return (torch.round(blocks * inverse) * (largest / qmax)).reshape(x.shape)


def fma(a, b, c):
    """float32 a * b + c rounded once, as an FMA instruction. In float64 a * b is exact and
    s = a * b + c is one rounding off, by err (exactly, TwoSum); rounding s to float32 gives the FMA's
    result except where s lies on a midpoint between two floats, where err says which side it was."""
    p, c = a.double() * b.double(), c.double()
    s = p + c
    back = s - p
    err = (p - (s - back)) + (c - back)
    r = s.float()
    other = torch.nextafter(r, torch.where(s > r.double(), torch.inf, -torch.inf).float())
    midpoint = (r.double() + other.double()) / 2 == s
    wrong_side = (err != 0) & ((err > 0) != (other.double() < s))
    return torch.where(midpoint & (r.double() != s) & wrong_side, other, r)


def kernel_reference(x, blocks, layout, bits):
    """The kernel's float32 output, bit for bit, in plain PyTorch (every build, every CPU: gguf_blocks.h):
    each block of x rounded to integers q (ties to even; 16 bits: hi * 255 + lo is q again), the exact
    integer dot products with the quants (Q4: the unsigned nibbles), then per block in order
    acc = fma(float(dot), d * scale, acc), and for Q4 acc = fma(minimum, scale * sum(q), acc)."""
    rows, cols = x.shape
    qmax = 127.0 if bits == 8 else 255.0 * 127 + 127
    xb = x.reshape(rows, -1, 32)
    largest = xb.abs().amax(-1)
    inverse = torch.where(largest > 0, torch.full_like(largest, qmax) / largest, 0)
    q = torch.round(xb * inverse.unsqueeze(-1))
    scale = torch.where(xb.isfinite().all(-1), largest / qmax, torch.nan)
    total = scale * q.sum(-1)  # integers below 2^24: summed exactly
    b = blocks.reshape(blocks.shape[0], -1, LAYOUTS[layout][1])
    d = b[..., 0:2].contiguous().view(torch.float16).float()[..., 0]
    if layout == "Q8_0":
        quants = b[..., 2:].contiguous().view(torch.int8)
    else:
        nibbles = b[..., 4:] if layout == "Q4_1" else b[..., 2:]
        quants = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1)
    minimum = b[..., 2:4].contiguous().view(torch.float16).float()[..., 0] if layout == "Q4_1" else d * -8.0
    dots = torch.einsum("mbk,nbk->mnb", q.double(), quants.double()).float()  # exact, then rounded once
    acc = torch.zeros(rows, blocks.shape[0])
    for j in range(cols // 32):
        acc = fma(dots[..., j], d[:, j] * scale[:, j, None], acc)
        if layout != "Q8_0":
            acc = fma(minimum[:, j].expand_as(acc), total[:, j, None].expand_as(acc), acc)
    return acc


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 32])
@pytest.mark.parametrize("bits", [8, 16])
def test_kernel_matmul_is_exact_over_its_rounded_activations(layout, rows, bits):
    blocks, weight = make_blocks(layout, rows=97)  # not a multiple of 8 rows, nor of a thread's share
    if layout == "Q8_0":  # quants of -128 (gguf-py never writes them; a file may): |w| is 128 unsigned
        b = blocks.view(97, -1, 34)
        b[:3, :, 2:] = torch.tensor(-128, dtype=torch.int8).view(torch.uint8)
        weight = dequantize_reference(blocks, layout, 320)
    x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, :32] *= 50  # one block with a large activation: its scale must not spoil the other blocks
    got = quant.kernels().gguf_linear(x, pack_blocks(blocks, layout), LAYOUTS[layout][0], 320, 97, bits)
    assert torch.equal(got, kernel_reference(x, blocks, layout, bits))
    # the integer products are exact; what remains is float32 rounding of each block's scale
    # product and of the sums, a few ulps of sum |x w|
    magnitude = x.abs().double() @ weight.abs().double().t()
    exact = rounded_activations(x, bits).double() @ weight.double().t()
    assert ((got.double() - exact).abs() <= 1e-6 * magnitude).all()
    # and against the true x: each x moves by at most half a step, so each output by sum |w| step / 2
    step = x.abs().reshape(rows, -1, 32).amax(-1).double() / (127 if bits == 8 else 255 * 127 + 127)
    bound = 1.01 * (step.repeat_interleave(32, dim=1) / 2) @ weight.abs().double().t()
    assert ((got.double() - x.double() @ weight.double().t()).abs() <= bound + 1e-6 * magnitude).all()


def test_kernel_outputs_nan_for_a_nan_or_infinite_activation():
    blocks, _ = make_blocks("Q8_0", rows=16)
    x = torch.randn(3, 320)
    x[1, 40], x[2, 300] = float("nan"), float("inf")
    for bits in (8, 16):
        got = quant.kernels().gguf_linear(x, pack_blocks(blocks, "Q8_0"), LAYOUTS["Q8_0"][0], 320, 16, bits)
        assert got[0].isfinite().all() and got[1:].isnan().all()


@pytest.mark.parametrize("bits", [8, 16])
def test_kernel_gives_a_row_the_same_bits_in_any_batch(bits):
    """Each row is rounded and summed on its own, in the same order, so a request's logits do not
    depend on what else is in its decode step (up to MAX_KERNEL_ROWS rows)."""
    blocks, _ = make_blocks("Q4_1", rows=97)
    packed, x = pack_blocks(blocks, "Q4_1"), torch.randn(quant.MAX_KERNEL_ROWS, 320)
    batch = quant.kernels().gguf_linear(x, packed, LAYOUTS["Q4_1"][0], 320, 97, bits)
    for i in (0, 5, quant.MAX_KERNEL_ROWS - 1):
        alone = quant.kernels().gguf_linear(x[i : i + 1], packed, LAYOUTS["Q4_1"][0], 320, 97, bits)
        assert torch.equal(alone[0], batch[i])


def test_kernel_reads_strided_rows():
    blocks, _ = make_blocks("Q4_1", rows=64)
    packed, wide = pack_blocks(blocks, "Q4_1"), torch.randn(4, 640)
    x = wide[:, 320:]  # the up half of a packed gate/up output: rows are strided
    for bits in (8, 16):
        got = quant.kernels().gguf_linear(x, packed, LAYOUTS["Q4_1"][0], 320, 64, bits)
        assert torch.equal(
            got, quant.kernels().gguf_linear(x.contiguous(), packed, LAYOUTS["Q4_1"][0], 320, 64, bits)
        )


def test_kernel_refuses_blocks_not_in_its_layout():
    blocks, _ = make_blocks("Q4_1", rows=64)
    with pytest.raises(RuntimeError, match="packed layout"):
        quant.kernels().gguf_linear(torch.randn(1, 320), blocks, LAYOUTS["Q4_1"][0], 320, 64, 16)
    with pytest.raises(RuntimeError, match="8 or 16"):
        quant.kernels().gguf_linear(
            torch.randn(1, 320), pack_blocks(blocks, "Q4_1"), LAYOUTS["Q4_1"][0], 320, 64, 4
        )


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("isa", ["avx2", "avx512-vnni"])
def test_modules_use_the_kernel_up_to_its_row_limit_and_exact_floats_past_it(bits, isa, monkeypatch):
    # the limit's policy per build (the kernel itself: this CPU's build), in a cache of the test's own
    monkeypatch.setattr(quant, "cpu_isa", lambda: isa)
    monkeypatch.setattr(quant, "kernel_row_limit", functools.cache(quant.kernel_row_limit.__wrapped__))
    blocks, weight = make_blocks("Q4_1")
    linear = QuantLinear(pack_blocks(blocks, "Q4_1"), "Q4_1", 320, 96, bias=True, activation_bits=bits)
    torch.nn.init.normal_(linear.bias)

    def kernel_exact(x):
        return rounded_activations(x, bits).double() @ weight.double().t() + linear.bias.double()

    prefill = torch.randn(quant.MAX_KERNEL_ROWS + 1, 320)
    if bits == 16 and isa == "avx2":  # past the limit: BLAS on the dequantized rows
        assert quant.kernel_row_limit(bits) == quant.MAX_KERNEL_ROWS
        torch.testing.assert_close(linear(prefill), prefill @ weight.t() + linear.bias)
    else:  # 8 bits, or a VNNI build: the kernel at every size
        assert quant.kernel_row_limit(bits) > 2**32
        torch.testing.assert_close(linear(prefill).double(), kernel_exact(prefill), rtol=1e-5, atol=1e-5)
    decode = torch.randn(2, 320)
    torch.testing.assert_close(linear(decode).double(), kernel_exact(decode), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the plain-PyTorch path (other devices and dtypes) reads the same packed bytes
        torch.testing.assert_close(
            linear(decode.double()), decode.double() @ weight.double().t() + linear.bias.double()
        )
    embedding = QuantEmbedding(linear.packed, "Q4_1", 96, 320)  # a tied head's bytes, shared
    ids = torch.tensor([[0, 5], [5, 95]])
    assert torch.equal(embedding(ids), weight[ids])


# ---- the fused per-layer ops: the CPU kernel against the torch code it replaces --------------------


@pytest.fixture
def reference_ops(monkeypatch):
    """Calls the ops with the kernels hidden: their plain-PyTorch code."""
    from llmasos.ops import activation, attention, norm, rotary

    def call(fn, *args, **kwargs):
        with monkeypatch.context() as mp:
            for module in (activation, attention, norm, rotary):
                mp.setattr(module, "cpu_kernels", lambda x: None)
            return fn(*args, **kwargs)

    return call


def test_fused_rms_norm_and_residual_add(reference_ops):
    from llmasos.ops.norm import RMSNorm

    norm = RMSNorm(576, 1e-5)
    torch.nn.init.normal_(norm.weight)
    x, residual = torch.randn(3, 576), torch.randn(3, 576)
    torch.testing.assert_close(norm(x), reference_ops(norm, x))
    expected, expected_residual = reference_ops(norm, x, residual.clone())
    got, got_residual = norm(x, residual)
    assert got_residual is residual  # added in place
    torch.testing.assert_close(got_residual, expected_residual, rtol=0, atol=0)
    torch.testing.assert_close(got, expected)


def test_fused_silu_and_mul(reference_ops):
    from llmasos.ops.activation import silu_and_mul

    x = torch.randn(5, 2 * 1536) * 6
    torch.testing.assert_close(silu_and_mul(x), reference_ops(silu_and_mul, x))


def test_fused_rotary_in_place_on_a_strided_view(reference_ops):
    from llmasos.ops.rotary import RotaryEmbedding, apply_rotary_

    cos, sin = RotaryEmbedding(64, 256, 10000.0)(torch.tensor([0, 7, 255]))
    qkv = torch.randn(3, 15 * 64)
    expected = reference_ops(apply_rotary_, qkv.clone()[:, : 12 * 64].view(3, 12, 64), cos, sin)
    got = apply_rotary_(qkv[:, : 12 * 64].view(3, 12, 64), cos, sin)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(qkv[:, : 12 * 64].view(3, 12, 64), expected)  # in place


@pytest.mark.parametrize("padded", [False, True])
# 96: a tail of V columns past the 256-bit kernel's 64 at a time; 40: not a multiple of 16 (the AVX-512
# build's 256-bit path)
@pytest.mark.parametrize("dim", [64, 96, 40])
def test_fused_kv_store_and_decode_attention(reference_ops, padded, dim):
    from llmasos.ops.attention import AttentionMetadata, paged_attention

    blocks, block_size, kv_heads, heads = 6, 12, 3, 9
    lens = [5, 45] if padded else [37, 37]  # past 32 positions: the vector max's whole chunks
    cache = torch.randn(2, blocks, block_size, kv_heads, dim)
    tables = torch.tensor([[4, 1, 0, 5], [2, 3, 5, 0]])  # each sequence's blocks, out of order
    positions = torch.arange(max(lens))
    slots = tables[:, positions // block_size] * block_size + positions % block_size
    for b, n in enumerate(lens):
        slots[b, n:] = slots[b, n - 1]  # padding repeats the last real slot, as the runner pads
    md = AttentionMetadata(
        slot_mapping=torch.stack([slots[b, n - 1] for b, n in enumerate(lens)]),
        decode_rows=torch.tensor([0, 1]),
        decode_kv_slots=slots[:, : max(lens)],
        decode_mask=(torch.arange(max(lens)) < torch.tensor(lens).unsqueeze(1))[:, None, None, :]
        if padded
        else None,
    )
    qkv = torch.randn(2, (heads + 2 * kv_heads) * dim)
    q = qkv[:, : heads * dim].view(2, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(2, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(2, kv_heads, dim)
    expected_cache = cache.clone()
    expected = reference_ops(paged_attention, q, k, v, expected_cache[0], expected_cache[1], md, 0.125)
    got = paged_attention(q, k, v, cache[0], cache[1], md, 0.125)
    assert torch.equal(cache, expected_cache)  # the same K/V rows written to the same slots
    torch.testing.assert_close(got, expected)
