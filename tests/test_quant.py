"""The CPU kernels against their plain-PyTorch references: the GGUF block matmul (both activation
paths) and dequantization against gguf-py, and the fused per-layer ops against the torch code they
replace on CPU."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from llmasos.ops import quant
from llmasos.ops.quant import LAYOUTS, QuantEmbedding, QuantLinear, dequantize_reference

pytestmark = pytest.mark.skipif(
    quant.kernels() is None, reason="the CPU kernels need AVX2 and a C++ compiler"
)


def make_blocks(layout, rows=96, cols=320, seed=0):
    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = quantize(weights, GGMLQuantizationType[layout])
    return torch.from_numpy(blocks), torch.from_numpy(dequantize(blocks, GGMLQuantizationType[layout]).copy())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_and_kernel_dequantize_exactly_like_gguf_py(layout):
    blocks, expected = make_blocks(layout)
    assert torch.equal(dequantize_reference(blocks, layout, 320), expected)
    assert torch.equal(quant.kernels().gguf_dequantize(blocks, LAYOUTS[layout][0], 320), expected)


FLOAT_PATH, INT16_PATH, AUTO_PATH = 0, 1, -1


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 32])
@pytest.mark.parametrize("path", [FLOAT_PATH, INT16_PATH, AUTO_PATH])
def test_kernel_matmul_matches_the_reference(layout, rows, path):
    blocks, weight = make_blocks(layout, rows=97)  # not a multiple of any row split
    x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, :32] *= 50  # one block with a large activation: its scale must not spoil the other blocks
    expected = x.double() @ weight.double().t()
    got = quant.kernels().gguf_linear(x, blocks, LAYOUTS[layout][0], 320, path)
    # float32 activations: only the summation order differs from a float matmul, a few float32 ulps
    # of sum |x w|. int16 activations: each x is rounded to a multiple of its block's scale
    # max|x_block| / 32767, so each output moves by at most sum_k |w_k| * scale_k / 2 (the integer
    # dot products are exact); the bound is computed per output and allowed with 1% slack.
    assert ((got.double() - expected).abs() <= error_bound(x, weight, path)).all()


def error_bound(x, weight, path):
    """How far the kernel may be from the exact matmul (see the test above)."""
    bound = 1e-6 * (x.abs().double() @ weight.abs().double().t())
    if path == INT16_PATH or (path == AUTO_PATH and x.shape[0] <= 4):
        scale = x.abs().reshape(x.shape[0], -1, 32).amax(-1).double() / 32767
        bound = bound + 1.01 * (scale.repeat_interleave(32, dim=1) / 2) @ weight.abs().double().t()
    return bound


def test_kernel_reads_strided_rows():
    blocks, _ = make_blocks("Q4_1", rows=64)
    packed = torch.randn(4, 640)
    x = packed[:, 320:]  # the up half of a packed gate/up output: rows are strided
    qtype = LAYOUTS["Q4_1"][0]
    for path in (FLOAT_PATH, INT16_PATH):
        got = quant.kernels().gguf_linear(x, blocks, qtype, 320, path)
        assert torch.equal(got, quant.kernels().gguf_linear(x.contiguous(), blocks, qtype, 320, path))


def test_modules_use_the_kernel_for_decode_and_exact_floats_for_prefill():
    blocks, weight = make_blocks("Q4_1")
    linear = QuantLinear(blocks, "Q4_1", 320, bias=True)
    torch.nn.init.normal_(linear.bias)
    prefill = torch.randn(quant.MAX_KERNEL_ROWS + 1, 320)
    torch.testing.assert_close(linear(prefill), prefill @ weight.t() + linear.bias)
    decode = torch.randn(2, 320)
    error = (linear(decode) - linear.bias).double() - decode.double() @ weight.double().t()
    assert (error.abs() <= error_bound(decode, weight, AUTO_PATH)).all()
    embedding = QuantEmbedding(blocks, "Q4_1", 320)
    ids = torch.tensor([0, 5, 5, 95])
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
def test_fused_kv_store_and_decode_attention(reference_ops, padded):
    from llmasos.ops.attention import AttentionMetadata, paged_attention

    blocks, block_size, kv_heads, heads, dim = 6, 4, 3, 9, 64
    lens = [5, 13] if padded else [9, 9]
    cache = torch.randn(2, blocks, block_size, kv_heads, dim)
    tables = torch.tensor([[4, 1, 0, 5], [2, 3, 5, 0]])  # each sequence's blocks, out of order
    positions = torch.arange(13)
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
