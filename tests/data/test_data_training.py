"""Training on a store dataset: its export is checked against the dataset digest, its tokens are
packed once per (dataset digest, tokenizer digest), and a damaged cache entry is rebuilt."""

import hashlib
import json

import numpy as np
import pytest

from llmasos.data.store import DatasetStore
from llmasos.store import ModelStore
from llmasos.train import data
from llmasos.train.pretrain import PretrainConfig, run_pretrain

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "One, two, three.",
]
ROWS = [{"text": SENTENCES[i % 3] * (1 + i % 4)} for i in range(60)]


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    datasets = DatasetStore()
    datasets.import_path(source, "corpus")
    return datasets


@pytest.fixture
def tokenize_calls(monkeypatch):
    calls = []
    real = data._tokenize

    def counting(files, tokenizer_dir):
        calls.append(files)
        return real(files, tokenizer_dir)

    monkeypatch.setattr(data, "_tokenize", counting)
    return calls


def test_the_export_is_checked_against_the_digest_and_rewritten_when_damaged(datasets):
    digest = datasets.get("corpus").digest
    (path,) = data.find_files(["corpus"])
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:100])  # a half-written or truncated export
    assert data.find_files(["corpus"]) == [path]
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert data.store_dataset("corpus")[1]["digest"] == digest


def test_packed_once_per_dataset_and_tokenizer_and_rebuilt_when_damaged(datasets, tmp_path, tokenize_calls):
    cache = tmp_path / "cache"
    files = data.find_files(["corpus"])
    tokenizer = data.train_tokenizer(files, 300, tmp_path / "tok")
    packed = (files, data.digest_files(files), tokenizer, 16, cache)
    rows = np.array(data.packed_tokens(*packed))
    # the same content under another name is the same dataset digest: the cache answers
    datasets.import_path(tmp_path / "corpus.jsonl", "corpus-copy")
    copy = data.find_files(["corpus-copy"])
    assert np.array_equal(data.packed_tokens(copy, data.digest_files(copy), tokenizer, 16, cache), rows)
    assert len(tokenize_calls) == 1 and len(list(cache.glob("packed-*.npy"))) == 1

    (entry,) = cache.glob("packed-*.npy")
    for damage in (entry.read_bytes()[: entry.stat().st_size // 2], b"not an array at all"):
        entry.write_bytes(damage)  # a partial copy, then garbage: ignored and rebuilt, never read
        assert np.array_equal(data.packed_tokens(*packed), rows)
    assert len(tokenize_calls) == 3 and not list(cache.glob(".packed-*"))  # no staged leftovers

    other = data.train_tokenizer(files, 290, tmp_path / "tok-290")  # another tokenizer: its own entry
    data.packed_tokens(files, packed[1], other, 16, cache)
    assert len(tokenize_calls) == 4 and len(list(cache.glob("packed-*.npy"))) == 2


def test_pretrain_on_a_store_dataset_tokenizes_once_and_records_it(datasets, tmp_path, tokenize_calls):
    manifest = datasets.get("corpus")
    for run in ("a", "b"):
        config = PretrainConfig(
            out_dir=tmp_path / run, data=["corpus"], vocab_size=300, max_steps=1, batch_size=2, seq_len=16,
            n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, warmup_steps=0, eval_fraction=0.0,
            precision="fp32", distributed="none", name=f"tiny-{run}",
        )  # fmt: skip
        run_pretrain(config)
    assert len(tokenize_calls) == 1  # the second run found the packed tokens in the cache
    card = json.loads((ModelStore().path("tiny-b") / "model_card.json").read_text())
    assert [d["digest"] for d in card["data"]["datasets"]] == [manifest.digest]
