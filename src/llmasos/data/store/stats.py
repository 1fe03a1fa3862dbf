"""`llmasos data stats`: what a dataset looks like, as Markdown and a PNG beside it.

Streamed over the shards' row groups, reading only the columns it needs: lengths and token counts
go into power-of-two buckets (fixed memory, and long-tailed lengths stay readable); exact
duplicates are counted from an 8-byte hash per row (the one part that grows with the data: 8 bytes a
row, sorted once at the end). Token counts use a store model's tokenizer (`--tokenizer`), else
whitespace-separated words, and say which. The language mix is read from a `language` (or `lang`)
column when a pipeline wrote one (`data prepare`'s `language_id` step does), else reported as not
measured. PII counts and what each step
removed come from the reports of the recipes that made the dataset and its ancestors (its lineage).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmasos.data.store.datasets import DatasetManifest, DatasetStore
from llmasos.errors import LLMasOSError

BUCKETS = 40  # 2**39 characters or tokens: longer than any document
_LANGUAGE_COLUMNS = ("language", "lang")


@dataclass
class DatasetStats:
    """The figures of one dataset; `steps` and `pii` are per ancestor dataset (lineage order)."""

    manifest: DatasetManifest
    column: str
    token_unit: str  # "tokens of MODEL" or "whitespace words"
    chars: np.ndarray = field(default_factory=lambda: np.zeros(BUCKETS, np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(BUCKETS, np.int64))
    total_chars: int = 0
    total_tokens: int = 0
    languages: Counter | None = None  # None: not measured
    duplicate_clusters: Counter = field(default_factory=Counter)  # cluster size -> clusters
    pii: dict[str, Counter] = field(default_factory=dict)  # dataset -> category -> count
    steps: dict[str, dict] = field(default_factory=dict)  # dataset -> step -> counts


def bucket_counts(values: np.ndarray) -> np.ndarray:
    """Counts per bucket: bucket 0 holds 0, bucket b >= 1 holds [2**(b-1), 2**b)."""
    buckets = np.zeros(len(values), np.int64)
    positive = values > 0
    buckets[positive] = np.floor(np.log2(values[positive])).astype(np.int64) + 1
    return np.bincount(np.minimum(buckets, BUCKETS - 1), minlength=BUCKETS)


def bucket_label(bucket: int) -> str:
    return "0" if bucket == 0 else f"{2 ** (bucket - 1)}-{2**bucket - 1}"


def collect(
    store: DatasetStore, name: str, column: str | None = None, tokenizer: tuple[str, Path] | None = None
) -> DatasetStats:
    """The stats of dataset `name`; `tokenizer` is (model name, its folder with tokenizer.json)."""
    manifest = store.get(name)
    column = text_column(manifest, column)
    language = next((c for c in _LANGUAGE_COLUMNS if c in manifest.schema), None)
    count_tokens = _token_counter(tokenizer[1]) if tokenizer else _words
    stats = DatasetStats(manifest, column, f"tokens of {tokenizer[0]}" if tokenizer else "whitespace words")
    stats.languages = Counter() if language else None
    hashes = []
    for table in store.batches(name, columns=[column, language] if language else [column]):
        texts = [t or "" for t in table.column(column).to_pylist()]
        chars = np.fromiter(map(len, texts), np.int64, len(texts))
        tokens = np.asarray(count_tokens(texts), np.int64)
        stats.chars += bucket_counts(chars)
        stats.tokens += bucket_counts(tokens)
        stats.total_chars += int(chars.sum())
        stats.total_tokens += int(tokens.sum())
        hashes.append(np.fromiter((_text_hash(t) for t in texts), np.uint64, len(texts)))
        if language:
            stats.languages.update(str(v) for v in table.column(language).to_pylist())
    _, sizes = np.unique(np.concatenate(hashes), return_counts=True)
    stats.duplicate_clusters = Counter(int(s) for s in sizes[sizes > 1])
    for dataset, report in lineage_reports(store, manifest):
        steps = report.get("steps") or {}
        stats.steps[dataset] = steps
        found = Counter()
        for counts in steps.values():
            found.update({k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("found:")})
        if found:
            stats.pii[dataset] = found
    return stats


def text_column(manifest: DatasetManifest, column: str | None) -> str:
    """`column`, else "text", else the only string column; an error lists the columns otherwise."""
    strings = [c for c, kind in manifest.schema.items() if kind in ("string", "large_string")]
    chosen = column or ("text" if "text" in strings else strings[0] if len(strings) == 1 else None)
    if chosen not in strings:
        described = ", ".join(f"{c} ({k})" for c, k in manifest.schema.items())
        raise LLMasOSError(
            f"dataset '{manifest.name}' has no text column {chosen or ''} to measure (its columns: "
            f"{described}); name a string column with --column"
        )
    return chosen


def lineage_reports(store: DatasetStore, manifest: DatasetManifest) -> list[tuple[str, dict]]:
    """(name, report) of the dataset and of each ancestor still in the store with the same digest."""
    found, seen = [], set()
    while manifest is not None and manifest.name not in seen:
        seen.add(manifest.name)
        if manifest.report:
            found.append((manifest.name, manifest.report))
        parent = next(
            (s for s in manifest.lineage.get("sources", []) if s["source"].startswith("dataset:")), None
        )
        manifest = None
        if parent and store.has(parent["source"].removeprefix("dataset:")):
            candidate = store.get(parent["source"].removeprefix("dataset:"))
            manifest = candidate if candidate.digest == parent["digest"] else None
    return found


def _words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def _token_counter(folder: Path):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.no_padding()
    backend.no_truncation()
    return lambda texts: [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]


def _text_hash(text: str) -> int:
    """8 bytes of BLAKE2 of the text, case and whitespace aside (as the exact_dedup step compares)."""
    normalized = " ".join(text.lower().split()).encode()
    return int.from_bytes(hashlib.blake2b(normalized, digest_size=8).digest(), "big")
