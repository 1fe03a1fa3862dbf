"""Two processes (torchrun, gloo on CPU) train like one: DDP and FSDP2 runs follow the loss curve of
a single process that accumulates the same global batch (2 sequences x 2 micro-batches or ranks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from llmasos.train.pretrain import PretrainConfig, run_pretrain

from tiny import save_tiny_model

pytestmark = pytest.mark.slow

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."]
CONFIG = """\
tokenizer: base
seq-len: 16
n-layers: 2
d-model: 32
n-heads: 4
n-kv-heads: 2
d-ff: 64
max-steps: 6
batch-size: 2
lr: 3e-3
warmup-steps: 1
log-every: 1
eval-every: 3
save-every: 3
precision: fp32
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store with the tokenizer every run shares, the data, and the one-process reference curve."""
    from llmasos.store import ModelStore

    root = tmp_path_factory.mktemp("distributed")
    os.environ["LLMASOS_HOME"] = str(root / "home")  # restored below: the subprocesses inherit it
    try:
        save_tiny_model(root / "base")
        ModelStore().import_path(root / "base", "base", progress=False)
        (root / "data.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 30))
        (root / "run.yaml").write_text(CONFIG + f"data: {root / 'data.jsonl'}\n")
        from llmasos.train.config import load_config

        config = load_config(
            PretrainConfig, root / "run.yaml", {"out_dir": root / "one", "grad_accum": 2, "name": "one"}
        )
        run_pretrain(config)
        yield root, curve(root / "one")
    finally:
        del os.environ["LLMASOS_HOME"]


def curve(out_dir) -> list[tuple[int, str, float]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [
        (r["step"], key, r[key]) for r in map(json.loads, lines) for key in ("loss", "eval_loss") if key in r
    ]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, mode):
    root, reference = setup
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "llmasos", "pretrain", "--config", str(root / "run.yaml"),
        "--distributed", mode, "--out-dir", str(root / mode), "--name", mode,
    ]  # fmt: skip
    torchrun(root, command)
    two = curve(root / mode)
    assert [(step, key) for step, key, _ in two] == [(step, key) for step, key, _ in reference]
    assert [value for *_, value in two] == pytest.approx([value for *_, value in reference], rel=1e-4)
    assert (root / "home" / "models" / mode / "model.safetensors").exists()

    if mode == "fsdp":  # resume the sharded run from step 3: steps 4-6 come out the same
        shutil.rmtree(root / mode / "checkpoints" / "step-000006")
        torchrun(root, [*command, "--resume"])
        assert curve(root / mode) == two


def torchrun(root, command: list[str]) -> None:
    env = {**os.environ, "LLMASOS_HOME": str(root / "home"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrained" in result.stdout
