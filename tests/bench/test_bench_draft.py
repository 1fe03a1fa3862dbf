"""`llmasos bench draft` on the tiny model: the float copy is made once, every system runs in a process
of its own and gives a figure, and the table has the draft's speed-up over each and its acceptance."""

import pytest
from typer.testing import CliRunner

from llmasos.bench.draft import ensure_float_copy, run_draft_bench
from llmasos.cli import app

pytestmark = pytest.mark.slow  # three child processes, each loading torch and a model or two


def test_every_system_gives_a_figure_and_the_float_copy_is_made_once(store, tmp_path):
    assert ensure_float_copy("tiny", "tiny-f32") == "tiny-f32"
    made = store.get("tiny-f32").digest
    assert ensure_float_copy("tiny", "tiny-f32") == "tiny-f32" and store.get("tiny-f32").digest == made

    # the float copy of the tiny float model, drafted for by the model itself
    rows, notes = run_draft_bench("tiny-f32", "tiny", k=2, max_tokens=6, questions=1, threads=1)
    assert [r.system for r in rows] == ["LLMasOS, draft model", "target alone", "draft model alone"]
    assert all(r.value and r.value > 0 for r in rows)
    assert all(r.speedup is not None for r in rows[1:])
    assert "acceptance " in rows[0].note and "answers the target's own: yes" in rows[0].note
    assert "torch threads: 1" in notes[1]

    output = tmp_path / "draft.md"
    result = CliRunner().invoke(
        app, ["bench", "draft", "--target", "tiny-f32", "--draft-model", "tiny", "--max-tokens", "3",
              "--questions", "1", "--output", str(output)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| decode, batch 1 | target alone |" in output.read_text()
