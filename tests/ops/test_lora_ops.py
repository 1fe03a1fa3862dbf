"""The per-row LoRA ops against their plain-PyTorch reference: the C++ BGMV kernel, the gathered
batched matmul it falls back to, and SGMV over prefill segments."""

import pytest
import torch

from llmasos.ops import lora as ops
from llmasos.ops.kernels import kernels
from llmasos.ops.lora import LoraBatch, LoraShard, add_lora, bgmv, bgmv_reference, sgmv

SLOTS, RANK, K = 5, 8, 72  # K not a multiple of 8: the kernel's tail loop runs


def shard(n: int = 40, offset: int = 3) -> LoraShard:
    torch.manual_seed(0)
    return LoraShard(torch.randn(SLOTS, RANK, K), torch.randn(SLOTS, RANK, n), offset)


def rows(num: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    slots = torch.tensor([2, -1, 0, 4, 2, -1, 1, 3, 0][:num])
    return torch.randn(num, K), torch.randn(num, 50), slots


@pytest.mark.parametrize("fast", ["kernel", "gathered"])
def test_bgmv_matches_the_reference(fast, monkeypatch):
    if fast == "kernel" and not hasattr(kernels(), "lora_bgmv"):
        pytest.skip("the CPU kernels are not built on this machine")
    if fast == "gathered":
        monkeypatch.setattr(ops, "cpu_kernels", lambda x: None)
    s, (x, y, slots) = shard(), rows()
    expected = y.clone()
    bgmv_reference(expected, x, s, slots)
    bgmv(y, x, s, slots)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[1], rows()[1][1])  # a row without an adapter is left alone
    assert not torch.equal(y[0], rows()[1][0])


def test_sgmv_is_bgmv_of_each_segment_row():
    s, (x, y, _) = shard(), rows()
    segments = [(0, 4, 3), (6, 9, 1)]
    per_row = torch.tensor([3] * 4 + [-1] * 2 + [1] * 3)
    expected = y.clone()
    bgmv_reference(expected, x, s, per_row)
    sgmv(y, x, s, segments)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_add_lora_applies_both_and_nothing_without_a_batch():
    s, (x, y, _) = shard(), rows()
    assert torch.equal(add_lora(y.clone(), x, [s], None), y)
    decode = torch.tensor([-1, -1, -1, -1, -1, -1, 1, 3, 0])
    got = add_lora(y.clone(), x, [s], LoraBatch(decode, [(0, 4, 2)]))
    expected = y.clone()
    bgmv_reference(expected, x, s, torch.tensor([2, 2, 2, 2, -1, -1, 1, 3, 0]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
