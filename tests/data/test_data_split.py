"""`llmasos data split`: a seeded hash of each row decides its side, so a split does not depend on
the rows' order, the batching or the machine; both datasets are registered, or neither."""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from llmasos.cli import app
from llmasos.data.store import DatasetStore, readers, row_line
from llmasos.data.store.split import SplitParams, split
from llmasos.errors import LLMasOSError, StoreError

ROWS = [{"id": i % 450, "text": f"line {i % 450}"} for i in range(500)]  # 50 exact duplicates


def imported(home, rows, name="corpus"):
    store = DatasetStore(home)
    source = home.parent / f"{home.name}-{name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store.import_path(source, name)
    return store


def sides(store, train, eval_):
    return [Counter(row_line(r) for r in store.rows(n)) for n in (train, eval_)]


def test_a_split_partitions_the_rows_and_records_its_lineage(tmp_path):
    store = imported(tmp_path / "home", ROWS)
    parent = store.get("corpus")
    train, held_out = split(store, "corpus", SplitParams(0.1, seed=0))
    assert (train.name, held_out.name) == ("corpus-train", "corpus-eval")
    train_rows, eval_rows = sides(store, "corpus-train", "corpus-eval")
    assert train_rows + eval_rows == Counter(row_line(r) for r in ROWS)  # every row, once
    assert not set(train_rows) & set(eval_rows)  # a duplicate never straddles the split
    assert 20 <= held_out.rows <= 80  # 10% of 500 in expectation
    for manifest, side in ((train, "train"), (held_out, "eval")):
        assert manifest.lineage["sources"] == [{"source": "dataset:corpus", "digest": parent.digest}]
        assert manifest.lineage["split"] | {"method": None} == {
            "side": side, "eval_fraction": 0.1, "seed": 0, "method": None,
        }  # fmt: skip
    other_seed = split(store, "corpus", SplitParams(0.1, seed=1), ("b-train", "b-eval"))[1]
    assert sides(store, "b-train", "b-eval")[1] != eval_rows and other_seed.rows > 0


def test_the_same_content_splits_the_same_way_whatever_its_order_batching_or_home(tmp_path, monkeypatch):
    first = imported(tmp_path / "a", ROWS)
    split(first, "corpus", SplitParams(0.2, seed=7))
    monkeypatch.setattr(readers, "BATCH_ROWS", 13)  # other batches, other row groups
    second = imported(tmp_path / "b", ROWS[::-1])
    split(second, "corpus", SplitParams(0.2, seed=7))
    assert sides(first, "corpus-train", "corpus-eval") == sides(second, "corpus-train", "corpus-eval")
    # and the order of the parent is kept on each side, so equal parents give equal digests
    third = imported(tmp_path / "c", ROWS)
    assert split(third, "corpus", SplitParams(0.2, seed=7))[1].digest == first.get("corpus-eval").digest


def test_a_split_that_would_leave_a_side_empty_registers_nothing(tmp_path):
    store = imported(tmp_path / "home", ROWS[:3])
    with pytest.raises(LLMasOSError, match=r"leaves the eval side empty"):
        split(store, "corpus", SplitParams(0.001, seed=0))
    assert [m.name for m in store.list()] == ["corpus"]
    assert len(list(store.store.blobs.iterdir())) == 1 and not any(store.store.tmp.iterdir())
    with pytest.raises(LLMasOSError, match="between 0 and 1"):
        SplitParams(1.5, seed=0)
    store2 = imported(tmp_path / "other", ROWS)
    store2.import_path(tmp_path / "other-corpus.jsonl", "corpus-eval")
    with pytest.raises(StoreError, match="'corpus-eval' already exists"):
        split(store2, "corpus", SplitParams(0.1, seed=0))
    assert not store2.has("corpus-train")


def test_a_failure_registering_the_second_side_unregisters_the_first(tmp_path, monkeypatch):
    store = imported(tmp_path / "home", ROWS)
    real, registered = store.register, []

    def full_disk(name, *args):
        if registered:
            raise OSError("No space left on device")
        registered.append(name)
        return real(name, *args)

    monkeypatch.setattr(store, "register", full_disk)
    with pytest.raises(OSError, match="No space"):
        split(store, "corpus", SplitParams(0.1, seed=0))
    assert registered == ["corpus-train"] and [m.name for m in store.list()] == ["corpus"]
    assert len(list(store.store.blobs.iterdir())) == 1  # the parent's shard alone


def test_cli_split_with_names(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    imported(tmp_path / "home", ROWS)
    result = CliRunner().invoke(
        app, ["data", "split", "corpus", "--eval", "0.5", "--seed", "3", "--names", "tr", "ev"]
    )
    assert result.exit_code == 0, result.output
    store = DatasetStore()
    rows = {n: store.get(n).rows for n in ("tr", "ev")}
    assert f"tr: {rows['tr']} rows" in result.output and f"ev: {rows['ev']} rows" in result.output
    assert rows["tr"] + rows["ev"] == len(ROWS) and store.get("ev").lineage["split"]["seed"] == 3
