"""GGUF block kernels against their plain-PyTorch reference and gguf-py's own dequantization."""

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


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [1, 3, 16, 32])
def test_kernel_matmul_matches_the_reference(layout, rows):
    blocks, weight = make_blocks(layout, rows=97)  # not a multiple of the kernel's row tile
    x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows))
    expected = x @ weight.t()
    got = quant.kernels().gguf_linear(x, blocks, LAYOUTS[layout][0], 320)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # only the summation order differs


def test_modules_use_the_kernel_for_decode_and_exact_floats_for_prefill():
    blocks, weight = make_blocks("Q4_1")
    linear = QuantLinear(blocks, "Q4_1", 320, bias=True)
    torch.nn.init.normal_(linear.bias)
    prefill = torch.randn(quant.MAX_KERNEL_ROWS + 1, 320)
    torch.testing.assert_close(linear(prefill), prefill @ weight.t() + linear.bias)
    decode = torch.randn(2, 320)
    torch.testing.assert_close(linear(decode), decode @ weight.t() + linear.bias, rtol=1e-4, atol=1e-4)
    embedding = QuantEmbedding(blocks, "Q4_1", 320)
    ids = torch.tensor([0, 5, 5, 95])
    assert torch.equal(embedding(ids), weight[ids])
