"""`llmasos bench train` on a tiny Llama: both systems train and are measured, the table has its
rows, and the FLOPs per token follow the stated formula. No timing thresholds: this is a smoke
run on a shared CPU; speed is the benchmark's business, not the test's."""

import pytest
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from llmasos.bench.train import (
    OURS,
    PEER,
    TrainBenchConfig,
    flops_per_token,
    llama_config,
    run_train_bench,
)
from llmasos.cli import app
from llmasos.errors import LLMasOSError

TINY = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, seq_len=32, batch_size=2, steps=3, warmup_steps=1)


def test_cpu_smoke_run(tmp_path):
    config = TrainBenchConfig(**TINY, peak_tflops=1.0, output=tmp_path / "table.md")
    rows = run_train_bench(config)
    by_key = {(r.workload, r.system): r for r in rows}

    ours, peer = by_key["pretrain tok/s", OURS], by_key["pretrain tok/s", PEER]
    assert ours.value > 0 and peer.value > 0
    assert peer.speedup == pytest.approx(ours.value / peer.value)
    ratio = by_key["pretrain speed-up", f"{OURS} / {PEER}"]
    assert ratio.value == pytest.approx(ours.value / peer.value)
    assert "goal >= 1.5x" in ratio.note

    # N: every parameter once (the tied embedding is one tensor), checked against Llama's shapes
    n_params = sum(p.numel() for p in LlamaForCausalLM(llama_config(config)).parameters())
    d, ff, vocab = 64, 128, 32000
    assert n_params == vocab * d + 2 * (4 * d * d + 3 * d * ff + 2 * d) + d
    flops = by_key["pretrain FLOPs", "per token"]
    assert flops.value * 1e6 == pytest.approx(6 * n_params + 12 * 2 * 64 * 32)
    assert flops_per_token(n_params, config) == 6 * n_params + 12 * 2 * 64 * 32

    # MFU against the peak given: FLOPs per token x tokens/s / 1 TFLOP/s
    mfu = by_key["pretrain MFU", OURS]
    assert mfu.value == pytest.approx(100 * flops.value * 1e6 * ours.value / 1e12)
    assert "| pretrain tok/s | transformers Trainer |" in (tmp_path / "table.md").read_text()


def test_the_command_takes_its_flags_and_says_mfu_na_without_a_peak(tmp_path):
    """`llmasos bench train`: the flags reach the config."""
    flags = ["bench", "train", "--n-layers", "2", "--d-model", "64", "--n-heads", "4", "--d-ff", "128"]
    flags += ["--seq-len", "32"]
    flags += ["--batch-size", "2", "--steps", "1", "--warmup-steps", "1", "--output", str(tmp_path / "t.md")]
    result = CliRunner().invoke(app, flags)
    assert result.exit_code == 0, result.output
    table = (tmp_path / "t.md").read_text()
    assert "MFU n/a" in table and "| pretrain MFU |" not in table
    assert "Llama 2.1M (2 layers, d_model 64, 4 heads, d_ff 128, vocab 32000), batch 2 x 32" in table


def test_bad_configs_fail_before_any_compute():
    with pytest.raises(LLMasOSError, match="warmup_steps"):
        TrainBenchConfig(**{**TINY, "warmup_steps": 0})
    with pytest.raises(LLMasOSError, match="device"):
        TrainBenchConfig(device="tpu")
    with pytest.raises(LLMasOSError, match="head size"):
        TrainBenchConfig(d_model=100, n_heads=12)
