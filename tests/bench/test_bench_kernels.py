"""`llmasos bench kernels`: every block matrix of a model timed in each system, with the right
multiply counts (never the speed: the machine is shared)."""

import pytest
from typer.testing import CliRunner

from llmasos.bench.kernels import kernel_systems, run_kernel_bench
from llmasos.cli import app
from llmasos.errors import LLMasOSError
from llmasos.ops.kernels import kernels
from llmasos.store import ModelStore
from llmasos.train.quantize import quantize_model

from tiny import save_tiny_model

pytestmark = pytest.mark.skipif(kernels() is None, reason="the CPU kernels cannot be built here")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    store = ModelStore()
    store.import_path(save_tiny_model(tmp_path / "llama", "llama"), "tiny")
    quantize_model(store, "tiny", "int4", "tiny-int4")
    return store


def test_every_matrix_in_every_system_with_its_multiply_count(store):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(store.path("tiny"))
    hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qkv = hidden + 2 * cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    per_layer = hidden * (qkv + hidden) + 3 * hidden * inter
    rows = run_kernel_bench("tiny-int4", [1, 3], repeats=1)
    assert [(r.rows, r.part, r.system) for r in rows] == [
        (n, part, system) for n in (1, 3) for part in ("layers", "head") for system in kernel_systems()
    ]
    for r in rows:
        expected = layers * per_layer if r.part == "layers" else hidden * cfg.vocab_size
        assert r.macs == r.rows * expected and r.seconds > 0


def test_a_model_without_blocks_is_refused_with_the_fix(store):
    with pytest.raises(LLMasOSError, match="llmasos quantize"):
        run_kernel_bench("tiny", [1], repeats=1)


def test_the_command_prints_every_system(store):
    args = ["bench", "kernels", "--model", "tiny-int4", "--rows", "2", "--repeats", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert all(system in result.output for system in kernel_systems())
