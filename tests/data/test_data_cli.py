"""`llmasos data ...` from the shell's side: the verbs, their output and their errors."""

import json

import pytest
from typer.testing import CliRunner

from llmasos.cli import app
from llmasos.errors import LLMasOSError


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, ["data", *map(str, args)])

    return invoke


def test_import_list_show_export_verify_rm(run, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3)))
    result = run("import", source, "--name", "tiny")
    assert result.exit_code == 0 and "imported tiny: 3 rows" in result.output
    assert "tiny" in run("list").output
    shown = run("show", "tiny").output
    assert f"from    file:{source}" in shown and "text (string)" in shown
    assert run("export", "tiny", tmp_path / "out.jsonl").exit_code == 0
    assert (tmp_path / "out.jsonl").read_text() == "".join(f'{{"text":"row {i}"}}\n' for i in range(3))
    assert run("verify", "tiny").output.strip() == "tiny: ok"
    assert run("rm", "tiny").exit_code == 0
    missing = run("show", "tiny")  # main() prints an LLMasOSError as one line; the runner keeps it raised
    assert isinstance(missing.exception, LLMasOSError) and "not in the store" in str(missing.exception)


def test_prepare_prints_per_step_counts_and_show_prints_the_recipe(run, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["same", "same", "other"]))
    (tmp_path / "clean.yaml").write_text("steps:\n  - exact_dedup: {}\n")
    run("import", source, "--name", "raw")
    result = run("prepare", "raw", "--recipe", tmp_path / "clean.yaml", "--name", "clean")
    assert result.exit_code == 0 and "prepared clean: 2 rows" in result.output
    assert "1. exact_dedup: in 3, removed:duplicate 1" in result.output
    shown = run("show", "clean").output
    assert "from    dataset:raw (sha256:" in shown and f"recipe  {tmp_path / 'clean.yaml'}" in shown
