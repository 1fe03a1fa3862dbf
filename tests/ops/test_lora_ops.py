"""The per-row LoRA ops against their plain-PyTorch reference: the C++ kernel (every row and every
shard of a projection in one call), the gathered batched matmul and SGMV over prefill segments it
falls back to elsewhere."""

import pytest
import torch

from llmasos.ops import lora as ops
from llmasos.ops.kernels import kernels
from llmasos.ops.lora import LoraBatch, LoraShard, add_lora, bgmv, bgmv_reference, kernel_shards, sgmv

SLOTS, RANK, K = 5, 8, 72  # K not a multiple of 8: the kernel's tail loop runs


def shard(n: int = 40, offset: int = 3, seed: int = 0) -> LoraShard:
    torch.manual_seed(seed)
    return LoraShard(torch.randn(SLOTS, RANK, K), torch.randn(SLOTS, RANK, n), offset)


def rows(num: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    slots = torch.tensor([2, -1, 0, 4, 2, -1, 1, 3, 0][:num])
    return torch.randn(num, K), torch.randn(num, 50), slots


def needs_kernel():
    if not hasattr(kernels(), "lora_bgmv"):
        pytest.skip("the CPU kernels are not built on this machine")


def test_the_gathered_bgmv_matches_the_reference():
    s, (x, y, slots) = shard(), rows()
    expected = y.clone()
    bgmv_reference(expected, x, s, slots)
    bgmv(y, x, s, slots)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[1], rows()[1][1])  # a row without an adapter is left alone
    assert not torch.equal(y[0], rows()[1][0])


def test_the_kernel_matches_the_reference_for_decode_and_prefill_rows_of_every_shard():
    needs_kernel()
    # three shards (q, k, v) side by side, 600 columns: full column blocks, tails of 8 and of 1 column
    shards = [shard(261, 0, seed=0), shard(43, 261, seed=1), shard(296, 304, seed=2)]
    torch.manual_seed(3)
    # prefill chunks of 13 and 6 rows (the 4-row tiles and their tails), decode rows, rows without
    slots = torch.tensor([3] * 13 + [-1, 1, 0, 1, -1] + [4] * 6 + [0, 2])
    x, y = torch.randn(len(slots), K), torch.randn(len(slots), 600)
    expected = y.clone()
    for s in shards:
        bgmv_reference(expected, x, s, slots)
    before = y.clone()
    kernels().lora_bgmv(y, x, *kernel_shards(shards), slots)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[13], before[13]) and not torch.equal(y[14], before[14])  # -1 rows left alone


def test_the_kernel_refuses_a_slot_past_the_last():
    needs_kernel()
    s, (x, y, _) = shard(), rows(2)
    with pytest.raises(RuntimeError, match="slot 5 of 5"):
        kernels().lora_bgmv(y, x, *kernel_shards([s]), torch.tensor([0, SLOTS]))


def test_sgmv_is_bgmv_of_each_segment_row():
    s, (x, y, _) = shard(), rows()
    segments = [(0, 4, 3), (6, 9, 1)]
    per_row = torch.tensor([3] * 4 + [-1] * 2 + [1] * 3)
    expected = y.clone()
    bgmv_reference(expected, x, s, per_row)
    sgmv(y, x, s, segments)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fast", ["kernel", "fallback"])
def test_add_lora_applies_decode_rows_and_segments_and_nothing_without_a_batch(fast, monkeypatch):
    if fast == "kernel":
        needs_kernel()
    else:  # the other devices' path: the gathered bgmv for decode rows, sgmv for segments
        monkeypatch.setattr(ops, "cpu_kernels", lambda x: None)
    s, (x, y, _) = shard(), rows()
    assert torch.equal(add_lora(y.clone(), x, [s], None), y)
    every_row = torch.tensor([2, 2, 2, 2, -1, -1, 1, 3, 0])
    decode = torch.tensor([-1, -1, -1, -1, -1, -1, 1, 3, 0])
    got = add_lora(y.clone(), x, [s], LoraBatch(every_row, decode, [(0, 4, 2)]))
    expected = y.clone()
    bgmv_reference(expected, x, s, every_row)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
