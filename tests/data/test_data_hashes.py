"""The dedup steps' on-disk state (pipeline/hashes.py): on a generated corpus with planted
duplicates, exact dedup removes exactly the planted copies and near dedup exactly the planted copies
and near copies, across batch boundaries; the index round-trips keys above 2**63; the files go on close."""

import json
from pathlib import Path

import numpy as np
import pytest

from llmasos.bench.data_corpus import CorpusShape, write_corpus
from llmasos.data.pipeline import hashes
from llmasos.data.pipeline.steps import ExactDedup, NearDedup


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    plan = write_corpus(path, 600_000, CorpusShape(exact=0.08, near=0.08, words=(200, 400), seed=3))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return plan, rows


def removed_ids(step, rows, batch=37):
    """Run `step` over the rows in batches (so duplicates span batches); the ids it dropped."""
    kept = set()
    for start in range(0, len(rows), batch):
        chunk = [(i + 1, row) for i, row in enumerate(rows[start : start + batch], start=start)]
        kept |= {row["id"] for _, row in step(chunk)}
    step.close()
    return sorted({row["id"] for row in rows} - kept)


def test_exact_dedup_removes_exactly_the_planted_copies(corpus):
    plan, rows = corpus
    assert len(plan.exact_duplicates) > 10 and plan.rows == len(rows)
    assert removed_ids(ExactDedup("exact_dedup", "text"), rows) == plan.exact_duplicates


def test_near_dedup_removes_exactly_the_planted_copies_and_near_copies(corpus):
    plan, rows = corpus
    assert len(plan.near_duplicates) > 10
    step = NearDedup("near_dedup", "text")
    assert removed_ids(step, rows) == sorted(plan.exact_duplicates + plan.near_duplicates)
    examples = step.report()["examples"]
    first = next(i for i in sorted(plan.exact_duplicates + plan.near_duplicates))
    assert examples[0].startswith(f"line {first + 1} ~ line ")


def test_key_index_round_trips_keys_above_2_63_with_every_ordinal(tmp_path):
    index = hashes.KeyIndex(str(tmp_path))
    keys = np.array([1, 2**63 + 5, 2**64 - 1, 2**63 + 5], dtype=np.uint64)
    index.add(keys, [10, 11, 12, 13])
    found = index.lookup(np.array([2**63 + 5, 2**64 - 1, 7], dtype=np.uint64))
    assert found == {2**63 + 5: [11, 13], 2**64 - 1: [12]}
    assert index.lookup(np.array([], dtype=np.uint64)) == {}
    index.close()


def test_signature_file_reads_back_each_record_by_ordinal(tmp_path):
    signatures = hashes.SignatureFile(str(tmp_path), num_perm=4)
    values = np.arange(12, dtype=np.uint64).reshape(3, 4) * (2**31)  # up to 2**32 - 1
    signatures.append([5, 9, 14], values % 2**32)
    signatures.append([20], np.full((1, 4), 2**32 - 1, dtype=np.uint64))
    line, signature = signatures.read(1)
    assert line == 9 and signature.tolist() == (values[1] % 2**32).tolist()
    assert signatures.read(3)[0] == 20 and signatures.count == 4
    signatures.close()


def test_band_keys_agree_on_equal_bands_only():
    bands = [(0, 2), (2, 4)]
    signatures = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [2, 1, 3, 4]], dtype=np.uint64)
    keys = hashes.band_keys(signatures, bands)
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] != keys[1, 1]
    assert keys[0, 0] != keys[2, 0] and keys[0, 1] == keys[2, 1]


def test_dedup_steps_remove_their_files_on_close():
    step = NearDedup("near_dedup", "text")
    folder = Path(step._folder.name)
    step([(1, {"text": "one two three four five six"})])
    assert (folder / "keys.sqlite").exists()
    step.close()
    assert not folder.exists()
