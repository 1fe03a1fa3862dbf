"""Datasets in the store: round trips, digests across input formats, atomic imports, shared blobs."""

import hashlib
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from llmasos.data.store import DatasetStore, readers
from llmasos.data.store.datasets import DatasetNotFoundError
from llmasos.errors import LLMasOSError, StoreError
from llmasos.store import ModelStore

ROWS = [{"id": i, "text": f'document {i} with ünïcode and "quotes"\n{"x" * (i % 7)}'} for i in range(50)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def store(tmp_path):
    return DatasetStore(tmp_path / "home")


def test_import_export_round_trip_and_digest_is_the_export_sha256(store, tmp_path):
    manifest = store.import_path(write_jsonl(tmp_path / "in.jsonl", ROWS), "docs")
    assert manifest.rows == len(ROWS) and manifest.schema == {"id": "int64", "text": "string"}
    out = tmp_path / "out.jsonl"
    assert store.export("docs", out) == len(ROWS)
    assert [json.loads(line) for line in out.read_text().splitlines()] == ROWS
    assert "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest() == manifest.digest
    assert store.verify("docs") == []
    assert manifest.lineage["sources"][0]["digest"].startswith("sha256:")
    assert [m.name for m in store.list()] == ["docs"]


def test_same_rows_same_digest_whatever_the_format_or_chunking(store, tmp_path, monkeypatch):
    from datasets import Dataset

    monkeypatch.setattr(readers, "BATCH_ROWS", 7)  # many batches, row groups
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=11)
    pacsv.write_csv(table, tmp_path / "in.csv")
    (tmp_path / "split").mkdir()
    write_jsonl(tmp_path / "split" / "a.jsonl", ROWS[:20])
    write_jsonl(tmp_path / "split" / "b.jsonl", ROWS[20:])
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "hf")
    digests = {
        source: store.import_path(tmp_path / source, source.replace(".", "-")).digest
        for source in ("in.parquet", "in.csv", "split", "hf")
    }
    digests["jsonl"] = store.import_path(write_jsonl(tmp_path / "in.jsonl", ROWS), "jsonl").digest
    assert len(set(digests.values())) == 1, digests


def test_text_folder_one_row_per_file(store, tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document")
    (folder / "sub" / "b.md").write_text("second\ndocument")
    store.import_path(folder, "texts")
    assert list(store.rows("texts")) == [{"text": "first document"}, {"text": "second\ndocument"}]


def test_a_failed_import_registers_nothing_and_leaves_no_blob(store, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:30]) + "{not json\n")
    with pytest.raises(LLMasOSError, match=r"bad.jsonl, line 31"):
        store.import_path(bad, "bad")
    assert store.list() == [] and not any(store.store.blobs.iterdir()) and not any(store.store.tmp.iterdir())


def test_columns_must_agree_across_files(store, tmp_path):
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "mixed" / "b.jsonl", [{"text": 1}])
    with pytest.raises(LLMasOSError, match=r"b.jsonl.*same columns and types"):
        store.import_path(tmp_path / "mixed", "mixed")


def test_names_are_not_reused_and_unknown_ones_are_named(store, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    store.import_path(data, "docs")
    with pytest.raises(StoreError, match="already exists"):
        store.import_path(data, "docs")
    with pytest.raises(StoreError, match="invalid dataset name"):
        store.import_path(data, "../up")
    with pytest.raises(DatasetNotFoundError, match="data import PATH --name nope"):
        store.get("nope")


def test_blobs_are_shared_with_models_and_collected_when_unreferenced(store, tmp_path):
    store.import_path(write_jsonl(tmp_path / "in.jsonl", ROWS), "docs")
    blobs = set(store.store.blobs.iterdir())
    ModelStore(store.store.home).collect_garbage()  # what removing a model runs
    assert set(store.store.blobs.iterdir()) == blobs and blobs
    store.remove("docs")
    assert not any(store.store.blobs.iterdir())


def test_verify_finds_a_corrupted_shard(store, tmp_path):
    manifest = store.import_path(write_jsonl(tmp_path / "in.jsonl", ROWS), "docs")
    blob = store.store.blob(next(iter(manifest.files.values()))["digest"])
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-3] + b"xyz")
    assert "corrupted" in store.verify("docs")[0]


def test_parquet_export_round_trips_to_the_same_rows_and_digest(store, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 7)  # several batches into one Parquet file
    manifest = store.import_path(write_jsonl(tmp_path / "in.jsonl", ROWS), "docs")
    assert store.export("docs", tmp_path / "out.parquet") == len(ROWS)
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == ROWS
    again = store.import_path(tmp_path / "out.parquet", "docs-again")
    assert again.digest == manifest.digest and again.schema == manifest.schema
    with pytest.raises(LLMasOSError, match=r"out.csv: name a .jsonl or a .parquet file"):
        store.export("docs", tmp_path / "out.csv")


def test_the_digest_is_the_same_on_another_machine_from_another_path(tmp_path):
    """Two homes, two source folders at different paths whose files were written in the opposite
    order: one digest, and it is the sha256 of the rows as canonical JSON lines, computed here
    from the definition alone (no pyarrow), as any other machine would."""
    for folder, order in (("one/corpus", (0, 1)), ("elsewhere/deeper/corpus", (1, 0))):
        (tmp_path / folder).mkdir(parents=True)
        for part in order:  # creation order differs; files are read in path order
            write_jsonl(tmp_path / folder / f"part-{part}.jsonl", ROWS[part * 25 : (part + 1) * 25])
    first = DatasetStore(tmp_path / "home-a").import_path(tmp_path / "one/corpus", "docs")
    second = DatasetStore(tmp_path / "home-b").import_path(tmp_path / "elsewhere/deeper/corpus", "other")
    canonical = "".join(
        json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n" for r in ROWS
    )
    assert first.digest == second.digest == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    assert first.source != second.source  # where it came from is lineage, not content


def test_an_interrupted_import_registers_nothing(store, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 5)
    real = readers.read_batches

    def interrupted(path):
        for number, batch in enumerate(real(path)):
            if number == 3:
                raise KeyboardInterrupt  # Ctrl-C halfway through
            yield batch

    monkeypatch.setattr(readers, "read_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.import_path(write_jsonl(tmp_path / "in.jsonl", ROWS), "docs")
    assert not store.has("docs") and store.list() == []
    assert not any(store.store.blobs.iterdir()) and not any(store.store.tmp.iterdir())
