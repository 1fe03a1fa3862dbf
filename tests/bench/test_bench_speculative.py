"""`llmasos bench --workloads C5`: the input-grounded prompts from the package's own files, LLMasOS
with and without prompt lookup, each in its own process, on a tiny model; no figure is checked against
a threshold (the machine is shared), only that the rows, drafts and outputs add up."""

import importlib.util

import pytest

from llmasos.bench.cpu import run_bench
from llmasos.bench.speculative import CODE, EDIT_TOKENS, HELDOUT, NEW_TOKENS, SUMMARIZE_TOKENS, build_workload
from llmasos.store import ModelStore
from llmasos.tokenizer import Tokenizer

from tiny import save_tiny_model, widen_context
from tiny_gguf import Q, write_tiny_gguf


@pytest.fixture
def tiny_store(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    ModelStore().import_path(
        widen_context(save_tiny_model(tmp_path / "llama", "llama")), "tiny"
    )  # 600-token prompts


def test_the_prompts_hold_the_shipped_texts(tiny_store):
    folder = ModelStore().resolve("tiny")
    workload = build_workload("tiny", folder, 16, 4)
    summarize, edit = workload.prompts["summarize"], workload.prompts["edit"]
    # the text cut to its size, then the request and the chat template around it
    assert SUMMARIZE_TOKENS * 0.8 < len(summarize) < SUMMARIZE_TOKENS + 100
    assert EDIT_TOKENS * 0.8 < len(edit) < EDIT_TOKENS + 100
    tokenizer = Tokenizer.from_dir(folder)
    assert HELDOUT.read_text()[:200] in tokenizer.decode(summarize)
    assert CODE.read_text()[:200] in tokenizer.decode(edit) and "apply_penalties" in tokenizer.decode(edit)


@pytest.mark.slow
def test_c5_measures_llmasos_with_and_without_drafts(tiny_store, tmp_path, capsys):
    output = tmp_path / "c5.md"
    rows = run_bench("tiny", ["C5"], [], output, num_speculative_tokens=3)
    assert [(r.workload, r.system) for r in rows] == [
        ("C5 summarize", "LLMasOS"),
        ("C5 summarize", "LLMasOS without"),
        ("C5 edit", "LLMasOS"),
        ("C5 edit", "LLMasOS without"),
    ]
    assert all(r.value is not None and r.value > 0 for r in rows)
    for speculating, plain in (rows[:2], rows[2:]):
        assert "same output" in speculating.note  # greedy decoding, verified exactly
        assert "tokens per forward" in speculating.note and plain.note == ""
        assert plain.speedup == pytest.approx(speculating.value / plain.value)
    markdown = output.read_text()
    assert f"{NEW_TOKENS} new tokens, greedy" in markdown and "up to 3 tokens" in markdown


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_c5_measures_llama_cpp_plain_and_with_its_lookup(tmp_path, monkeypatch):
    """The peers on a tiny GGUF: llama.cpp's own lookup decoding counted around its binding."""
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    ModelStore().import_path(write_tiny_gguf(tmp_path / "q8.gguf", "llama", Q.Q8_0), "tiny-gguf")
    rows = run_bench("tiny-gguf", ["C5"], ["llama.cpp"])
    systems = ["LLMasOS", "LLMasOS without", "llama.cpp", "llama.cpp lookup"]
    assert [r.system for r in rows] == systems * 2
    assert all(r.value is not None and r.value > 0 for r in rows), [r.note for r in rows]
    for lookup in rows[3], rows[7]:
        assert "tokens per forward" in lookup.note and "its plain decode" in lookup.note
