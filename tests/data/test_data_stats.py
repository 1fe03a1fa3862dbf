"""`llmasos data stats`: figures checked against counts made here by other means (int.bit_length
for the buckets, transformers' tokenizer for tokens), whatever the batching; steps and PII read
back through the lineage."""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from llmasos.cli import app
from llmasos.data.pipeline.run import prepare
from llmasos.data.store import DatasetStore, readers
from llmasos.data.store.split import SplitParams, split
from llmasos.data.store.stats import collect
from llmasos.errors import LLMasOSError

ROWS = [
    {"text": f"Document {i} " + "word " * (i * 3), "language": "fr" if i % 4 == 0 else "en"}
    for i in range(40)
]
ROWS += [{"text": "Write to alice@example.com today", "language": "en"}] * 3  # one cluster of 3
ROWS += [
    {"text": "the SAME   text", "language": "en"},
    {"text": "The same text", "language": "en"},
]  # and of 2


def bucket_rows(lengths):
    """Rows per power-of-two bucket, the way a reader would count them: bucket b holds [2**(b-1), 2**b)."""
    return Counter(n.bit_length() for n in lengths)


@pytest.fixture
def datasets(tmp_path, monkeypatch, store):  # store: the conftest's home with the tiny model
    datasets = DatasetStore()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    datasets.import_path(source, "raw")
    (tmp_path / "clean.yaml").write_text("steps:\n  - exact_dedup: {}\n  - scrub: {action: redact}\n")
    prepare(datasets, "raw", str(tmp_path / "clean.yaml"), "clean", progress=False)
    yield datasets
    for m in datasets.list():
        datasets.remove(m.name)


def test_lengths_languages_and_duplicates_whatever_the_batching(datasets, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 4)  # many batches: the counts must add up the same
    stats = collect(datasets, "raw")
    texts = [r["text"] for r in ROWS]
    assert Counter(dict(enumerate(stats.chars))) - Counter() == bucket_rows(map(len, texts))
    assert Counter(dict(enumerate(stats.tokens))) - Counter() == bucket_rows(len(t.split()) for t in texts)
    assert stats.total_chars == sum(map(len, texts)) and stats.token_unit == "whitespace words"
    assert stats.languages == Counter(r["language"] for r in ROWS)
    assert stats.duplicate_clusters == Counter({3: 1, 2: 1})
    assert stats.steps == {} and stats.pii == {}


def test_tokens_by_a_store_tokenizer_and_the_lineage_reports(datasets, store):
    from transformers import AutoTokenizer

    split(datasets, "clean", SplitParams(0.3, seed=0))
    tokenizer = AutoTokenizer.from_pretrained(store.path("tiny"))
    stats = collect(datasets, "clean-train", tokenizer=("tiny", store.path("tiny")))
    texts = [r["text"] for r in datasets.rows("clean-train")]
    counts = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert stats.total_tokens == sum(counts) and stats.token_unit == "tokens of tiny"
    assert Counter(dict(enumerate(stats.tokens))) - Counter() == bucket_rows(counts)
    # the split has no report: its parent's recipe is found through the lineage
    assert list(stats.steps) == ["clean"] and stats.steps["clean"]["1. exact_dedup"]["removed:duplicate"] == 3
    assert stats.pii == {"clean": Counter({"email": 1})}  # the one copy exact_dedup kept


def test_cli_writes_markdown_and_png_beside_the_dataset_or_to_out(datasets, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "stats", "clean", "--tokenizer", "tiny"])
    assert result.exit_code == 0, result.output
    markdown = datasets.stats_folder("clean") / "clean-stats.md"
    assert result.output.strip() == str(markdown)
    text = markdown.read_text()
    assert "tokens of tiny" in text and "| 1. exact_dedup | 45 | 3 | duplicate 3 |" in text
    assert "- by the recipe of clean: email 1" in text and "- en: " in text
    assert (markdown.parent / "clean-stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = runner.invoke(app, ["data", "stats", "raw", "--out", str(tmp_path / "report")])
    raw = (tmp_path / "report" / "raw-stats.md").read_text()
    assert out.exit_code == 0 and "2 clusters hold 5 rows" in raw and "whitespace words" in raw
    datasets.remove("clean")
    assert not datasets.stats_folder("clean").exists()  # removed with the dataset


def test_a_dataset_without_a_text_column_names_its_columns(datasets, tmp_path):
    (tmp_path / "n.jsonl").write_text('{"a": 1, "b": 2}\n')
    datasets.import_path(tmp_path / "n.jsonl", "numbers")
    with pytest.raises(LLMasOSError, match=r"its columns: a \(int64\), b \(int64\).*--column"):
        collect(datasets, "numbers")
    with pytest.raises(LLMasOSError, match="no text column nope"):
        collect(datasets, "raw", column="nope")
