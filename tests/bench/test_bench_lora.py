"""`llmasos bench lora` on the tiny model: the adapters are made once, every system runs in a process
of its own and gives a figure, and the table has the mix's speed-up over each (never the speed)."""

import pytest
from typer.testing import CliRunner

from llmasos.bench.lora import SYSTEMS, adapter_names, ensure_adapters, run_lora_bench
from llmasos.cli import app

pytestmark = pytest.mark.slow  # four child processes, each loading torch and a model


def test_every_system_gives_a_figure_and_the_adapters_are_made_once(store, tmp_path, monkeypatch):
    rows, notes = run_lora_bench("tiny", adapters=2, requests=4, max_tokens=3, rank=4, repeats=1, rounds=2)
    assert [r.system for r in rows] == ["LLMasOS", *list(SYSTEMS)[1:]]
    assert all(r.value and r.value > 0 and not r.note for r in rows), [(r.system, r.note) for r in rows]
    assert all(r.speedup is not None for r in rows[1:])
    assert "2 adapters mixed in one batch" in notes[0] and "x 2 round(s)" in notes[0]
    assert "load average before: " in notes[1] and ", after: " in notes[1]
    names = adapter_names("tiny", 2)
    assert all((store.path(name) / "adapter_config.json").is_file() for name in names)
    made = [store.get(name).digest for name in names]
    assert ensure_adapters("tiny", 2, 4) == names and [store.get(n).digest for n in names] == made

    output = tmp_path / "lora.md"
    result = CliRunner().invoke(
        app, ["bench", "lora", "--model", "tiny", "--adapters", "2", "--requests", "2", "--max-tokens", "2",
              "--rank", "4", "--repeats", "1", "--output", str(output)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| LoRA mix | one merged model (float32) |" in output.read_text()
