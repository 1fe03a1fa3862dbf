"""Pretraining data: text files -> token ids -> fixed-length packed sequences, cached on disk.

Documents come from .txt files (a file is one document), JSONL (each line's "text") and Parquet
(the "text" column). They are tokenized once, joined with EOS after each document, and cut into
rows of seq_len + 1 tokens: a row's first seq_len tokens are the input and its last seq_len the
labels, so every position predicts the next token, document boundaries included.

The packed array is cached in $LLMASOS_HOME/cache/train/packed-<key>.npy, keyed by the data's
content digest, the tokenizer files and seq_len, written atomically, and memory-mapped, so a
second run (or every rank of a distributed one) starts at once. Every file is checked while it is
read, so bad data fails before any training compute, naming the file and line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llmasos.errors import LLMasOSError
from llmasos.files import read_jsonl

SUFFIXES = (".txt", ".jsonl", ".parquet")
EOS = "<|endoftext|>"
_CACHE_VERSION = "1"
_CHUNK = 1 << 20


def store_dataset(given: str | Path) -> tuple[Path, dict | None]:
    """`given` as a data file: a path as it is; the name of a dataset in the store (`llmasos data
    list`) exported once into cache/data/ as JSONL, whose sha256 is the dataset digest. The dict is
    what the model card records of a store dataset: name, digest, rows, sources and recipe (None for
    a path), so that `llmasos show --card` tells what the model was trained on."""
    from llmasos.data.store import DatasetStore

    path = Path(given).expanduser()
    datasets = DatasetStore()
    if path.exists() or not datasets.has(str(given)):
        return path, None
    manifest = datasets.get(str(given))
    exported = datasets.exported(manifest.name)  # checked against the digest, written again if damaged
    record = {"name": manifest.name, "digest": manifest.digest, "rows": manifest.rows}
    return exported, {**record, **manifest.lineage}


def store_datasets(paths: list[str]) -> list[dict]:
    """What the model card records of the store datasets among `paths` (see store_dataset)."""
    return [record for record in (store_dataset(p)[1] for p in paths) if record]


def find_files(paths: list[str]) -> list[Path]:
    """The data files named: files as given, folders searched for .txt/.jsonl/.parquet, in order,
    store datasets by name (see store_dataset)."""
    if not paths:
        raise LLMasOSError(
            "no training data: give --data with text files (.txt, .jsonl, .parquet), a folder or a dataset"
        )
    files: list[Path] = []
    for given in paths:
        path = store_dataset(given)[0]
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise LLMasOSError(f"data folder {path} has no {', '.join(SUFFIXES)} files")
            files += found
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise LLMasOSError(
                    f"data file {path}: unknown format '{path.suffix}'; use {', '.join(SUFFIXES)}"
                )
            files.append(path)
        else:
            raise LLMasOSError(f"data file {path} does not exist")
    return files


def read_documents(path: Path) -> list[str]:
    """The documents of one file; an error names the file (and line) when it is unreadable or empty."""
    if path.suffix == ".txt":
        try:
            documents = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise LLMasOSError(f"{path} is not UTF-8 text ({e})") from e
    elif path.suffix == ".jsonl":
        documents = _read_jsonl(path)
    else:
        documents = _read_parquet(path)
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise LLMasOSError(f"data file {path} is empty: it has no text")
    return documents


def _read_jsonl(path: Path) -> list[str]:
    documents = []
    for number, record in read_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise LLMasOSError(f'{path}, line {number}: expected an object with a "text" string')
        documents.append(record["text"])
    return documents


def _read_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
        if "text" not in columns:
            raise LLMasOSError(f'{path} has no "text" column (its columns: {", ".join(columns)})')
        values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise LLMasOSError(f"{path} is not a readable Parquet file ({e})") from e
    if any(v is not None and not isinstance(v, str) for v in values):
        raise LLMasOSError(f'{path}: the "text" column must hold strings')
    return [v for v in values if v is not None]


def digest_files(files: list[Path]) -> str:
    """The content digest of the data (names and places do not count, order does)."""
    hasher = hashlib.sha256()
    for path in files:
        file_hash = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                file_hash.update(chunk)
        hasher.update(file_hash.digest())
    return "sha256:" + hasher.hexdigest()


def train_tokenizer(files: list[Path], vocab_size: int, out: Path) -> Path:
    """A byte-level BPE tokenizer learned from the data (any text encodes, no unknown tokens), with
    EOS = BOS = PAD = <|endoftext|>, saved as tokenizer.json + tokenizer_config.json in `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise LLMasOSError(f"vocab_size must be at least {len(alphabet) + 1} (the 256 bytes and EOS)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator((doc for path in files for doc in read_documents(path)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    fast.save_pretrained(work)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return out


def packed_tokens(
    files: list[Path], data_digest: str, tokenizer_dir: Path, seq_len: int, cache: Path
) -> np.ndarray:
    """All the data as rows of seq_len + 1 tokens (memory-mapped from the cache when it is there).
    `data_digest` is `digest_files(files)`, computed once by the caller, who also records it."""
    if seq_len < 1:
        raise LLMasOSError(f"seq_len must be at least 1, got {seq_len}")
    key = hashlib.sha256(
        "|".join([_CACHE_VERSION, data_digest, _tokenizer_digest(tokenizer_dir), str(seq_len)]).encode()
    ).hexdigest()[:32]
    target = cache / f"packed-{key}.npy"
    cached = _load_packed(target, seq_len)
    if cached is not None:
        return cached
    rows = _pack(_tokenize(files, tokenizer_dir), seq_len)
    cache.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=cache, prefix=".packed-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, target)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return np.load(target, mmap_mode="r")


def _load_packed(target: Path, seq_len: int) -> np.ndarray | None:
    """The cached rows, or None when there are none or the file is not a whole array of rows of
    seq_len + 1 (a partial or damaged entry, e.g. copied in half: it is rebuilt, never trained on)."""
    if not target.is_file():
        return None
    try:
        rows = np.load(target, mmap_mode="r")
    except (ValueError, OSError, EOFError):
        return None
    return rows if rows.ndim == 2 and rows.shape[1] == seq_len + 1 and len(rows) else None


def _tokenize(files: list[Path], tokenizer_dir: Path) -> np.ndarray:
    from tokenizers import Tokenizer as Backend

    from llmasos.tokenizer import Tokenizer

    eos_ids = Tokenizer.from_dir(tokenizer_dir).eos_token_ids
    if not eos_ids:
        raise LLMasOSError(f"the tokenizer in {tokenizer_dir} has no EOS token to end documents with")
    backend = Backend.from_file(str(tokenizer_dir / "tokenizer.json"))  # encode_batch: all cores
    backend.no_padding()
    backend.no_truncation()
    pieces = []
    for path in files:
        for encoding in backend.encode_batch(read_documents(path), add_special_tokens=False):
            pieces += [encoding.ids, eos_ids[:1]]
    ids = np.fromiter((i for piece in pieces for i in piece), dtype=np.int64)
    return ids.astype(np.uint16 if backend.get_vocab_size() <= 2**16 else np.int32)


def _pack(ids: np.ndarray, seq_len: int) -> np.ndarray:
    rows = len(ids) // (seq_len + 1)
    if rows < 1:
        raise LLMasOSError(
            f"the data has {len(ids)} tokens, too few for one sequence of seq_len + 1 = {seq_len + 1}; "
            "add text or lower --seq-len"
        )
    return np.ascontiguousarray(ids[: rows * (seq_len + 1)].reshape(rows, seq_len + 1))


def _tokenizer_digest(tokenizer_dir: Path) -> str:
    hasher = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = tokenizer_dir / name
        hasher.update(path.read_bytes() if path.is_file() else b"")
    return hasher.hexdigest()


def split(rows: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out row indices, by sequence, seeded; at least one of each (no held-out rows
    when eval_fraction is 0)."""
    if eval_fraction <= 0:
        return np.arange(rows), np.arange(0)
    if rows < 2:
        raise LLMasOSError(
            f"the data makes {rows} sequence(s); at least 2 are needed (one to train on, one held out "
            "for evaluation): add text or lower --seq-len"
        )
    held_out = min(rows - 1, max(1, round(rows * eval_fraction)))
    order = np.random.default_rng(seed).permutation(rows)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


class PackedText:
    """A BatchSource over some rows of a packed array: an endless stream of the rows, reshuffled
    each epoch by a generator seeded with (seed, epoch), so any micro-batch can be read by index."""

    def __init__(self, tokens: np.ndarray, rows: np.ndarray, seed: int):
        if len(rows) == 0:
            raise LLMasOSError("no sequences to read")
        self.tokens, self.rows, self.seed = tokens, rows, seed
        self.num_examples = len(rows)
        self._epoch: tuple[int, np.ndarray] | None = None

    def batch(self, index: int, batch_size: int) -> dict[str, Tensor]:
        positions = np.arange(index * batch_size, (index + 1) * batch_size)
        picks = np.array([self._order(p // self.num_examples)[p % self.num_examples] for p in positions])
        rows = torch.from_numpy(self.tokens[self.rows[picks]].astype(np.int64))
        return {
            "input_ids": rows[:, :-1],
            "labels": rows[:, 1:],
            "attention_mask": torch.ones_like(rows[:, :-1]),
        }

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples))
        return self._epoch[1]
