"""What a step of `data prepare` is, and the filtering steps: datatrove's quality filters, exact and
MinHash near-duplicate removal.

A step takes a batch of rows and returns the rows it keeps (possibly changed), counting why it
dropped the others in `counts`, so the pipeline streams: memory is one batch plus what a step must
remember across batches: the dedup steps keep their hashes on disk (hashes.py), so a step's RAM is
bounded whatever the dataset's size.

Quality filters are datatrove's own classes (GopherQualityFilter, GopherRepetitionFilter,
C4QualityFilter, FineWebQualityFilter), called per document with their reasons as counts. Two of
datatrove's steps are not used, and why:
- LanguageFilter downloads a fastText model from the hub on first use; this platform must work
  offline, so the `language_id` step runs on py3langid instead (language.py).
- datatrove's MinHash dedup is four out-of-core stages (signatures, buckets, clusters, filter) over
  folders of files, run by an executor; a streamed step over the store's batches is simpler with
  datasketch's MinHash (the library datatrove's own docs compare against), banded as its LSH, with
  the bands and signatures in a SQLite index and a flat file on disk instead of datasketch's
  in-memory LSH (~2 KiB of RAM a row kept).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from llmasos.data.pipeline import hashes
from llmasos.errors import LLMasOSError

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens: the unit of n-grams for near-dup and decontamination."""
    return _WORD.findall(text.lower())


def needs(module: str, step: str):
    """The library a step runs on, or an error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LLMasOSError(
            f"step {step} needs {module.split('.')[0]} ({e}); install it with `pip install 'llmasos[data]'`"
        ) from e


@dataclass
class Step:
    """A step's name in the recipe, the column it reads, and what it did (`counts`, `examples`)."""

    name: str
    column: str
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # a few findings to show the user

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        """The (line, row) pairs kept, changed where the step changes rows; `line` is the row's line
        (1-based) in the source dataset's export, so reports point at it."""
        raise NotImplementedError

    def text(self, row: dict, line: int) -> str:
        value = row.get(self.column)
        if not isinstance(value, str):
            raise LLMasOSError(
                f"step {self.name}: line {line} has no string column '{self.column}' "
                f"(its columns: {', '.join(row)}); set `column:` in the recipe"
            )
        return value

    def note(self, example: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(example)

    def columns(self) -> tuple:
        """The columns (pyarrow fields) the step adds to every row it keeps."""
        return ()

    def close(self) -> None:
        """Let go of what the step kept across batches (the dedup steps' files on disk)."""

    def report(self) -> dict:
        return {**dict(self.counts), **({"examples": self.examples} if self.examples else {})}


@dataclass
class QualityFilter(Step):
    """One of datatrove's filters: rows it rejects are dropped, counted by datatrove's reason."""

    filter: object = None  # a datatrove BaseFilter

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        from datatrove.data import Document

        kept = []
        for line, row in rows:
            verdict = self.filter.filter(Document(text=self.text(row, line), id=str(line)))
            ok, reason = (verdict, None) if isinstance(verdict, bool) else verdict
            if ok:
                kept.append((line, row))
            else:
                self.counts[f"removed:{reason or 'rejected'}"] += 1
        return kept


QUALITY_FILTERS = {
    "gopher_quality": "GopherQualityFilter",
    "gopher_repetition": "GopherRepetitionFilter",
    "c4_quality": "C4QualityFilter",
    "fineweb_quality": "FineWebQualityFilter",
}


_WORD_FILTERS = ("gopher_quality", "gopher_repetition", "fineweb_quality")  # they split words


def quality_filter(step: str, column: str, options: dict) -> QualityFilter:
    """datatrove's filter with the recipe's options; English words are split by word_tokens.py's
    tokenizer (spaCy's tokens, cached by chunk) instead of datatrove's own spaCy tokenizer."""
    import inspect

    from llmasos.data.pipeline import word_tokens

    filters = needs("datatrove.pipeline.filters", step)
    cls = getattr(filters, QUALITY_FILTERS[step])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "exclusion_writer"}
    for key in options:
        if key not in accepted:
            raise LLMasOSError(
                f"step {step}: unknown field '{key}' (datatrove's {cls.__name__} takes "
                f"{', '.join(sorted(accepted))})"
            )
    if step in _WORD_FILTERS and options.get("language", "eng") in ("eng", "en"):
        options = {**options, "language": word_tokens.english()}
    try:
        return QualityFilter(step, column, filter=cls(**options))
    except (TypeError, ValueError) as e:
        raise LLMasOSError(f"step {step}: {e}") from e


@dataclass
class ExactDedup(Step):
    """Drop rows whose text, case and whitespace aside, was seen before; the 8-byte hashes of the
    kept rows are kept on disk (hashes.KeyIndex), so memory does not grow with the dataset."""

    _folder: object = None
    _index: object = None

    def __post_init__(self):
        self._folder = hashes.spill_folder()
        self._index = hashes.KeyIndex(self._folder.name)

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        keys = np.array([_text_hash(self.text(row, line)) for line, row in rows], dtype=np.uint64)
        seen = set(self._index.lookup(keys))
        kept, new = [], []
        for (line, row), key in zip(rows, keys.tolist()):
            if key in seen:
                self.counts["removed:duplicate"] += 1
                continue
            seen.add(key)
            new.append(key)
            kept.append((line, row))
        self._index.add(new, [line for line, _ in kept])
        return kept

    def close(self) -> None:
        self._index.close()
        self._folder.cleanup()


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(words(text)).encode(), digest_size=8).digest(), "little")


_SHINGLE_ROWS = 256  # rows whose shingles are made at once


@dataclass
class NearDedup(Step):
    """Drop rows whose word n-gram set has an estimated Jaccard similarity >= threshold with a row
    kept earlier: datasketch's MinHash signatures, banded as its MinHashLSH would (its optimal bands
    and rows for the threshold), find candidates; comparing signatures confirms (so the threshold
    holds). The bands and signatures of kept rows are on disk (hashes.py), not in RAM."""

    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    _bands: list = field(default_factory=list)  # (start, end) of each LSH band in a signature
    _folder: object = None
    _index: object = None
    _signatures: object = None

    def __post_init__(self):
        datasketch = needs("datasketch", self.name)
        self._bands = datasketch.MinHashLSH(threshold=self.threshold, num_perm=self.num_perm).hashranges
        self._folder = hashes.spill_folder()
        self._index = hashes.KeyIndex(self._folder.name)
        self._signatures = hashes.SignatureFile(self._folder.name, self.num_perm)

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        from datasketch import MinHash

        signatures = np.empty((len(rows), self.num_perm), dtype=np.uint64)
        for start in range(0, len(rows), _SHINGLE_ROWS):  # a batch's shingles would take ~100 MiB
            shingles = []
            for line, row in rows[start : start + _SHINGLE_ROWS]:
                tokens = words(self.text(row, line))
                starts = range(max(1, len(tokens) - self.ngram + 1))
                shingles.append([" ".join(tokens[j : j + self.ngram]).encode() for j in starts])
            for i, minhash in enumerate(MinHash.bulk(shingles, num_perm=self.num_perm), start=start):
                signatures[i] = minhash.hashvalues
        keys = hashes.band_keys(signatures, self._bands)
        stored = self._index.lookup(keys.ravel())
        batch: dict[int, list[int]] = {}  # band key -> positions in this batch of the rows kept
        kept, kept_at = [], []
        for i, ((line, row), signature) in enumerate(zip(rows, signatures)):
            row_keys = keys[i].tolist()
            match = self._earlier_match(signature, {o for k in row_keys for o in stored.get(k, ())})
            if match is None:
                here = sorted({p for k in row_keys for p in batch.get(k, ())})
                match = next((rows[p][0] for p in here if self._similar(signature, signatures[p])), None)
            if match is not None:
                self.counts["removed:near_duplicate"] += 1
                self.note(f"line {line} ~ line {match}")
                continue
            for k in row_keys:
                batch.setdefault(k, []).append(i)
            kept_at.append(i)
            kept.append((line, row))
        ordinals = np.arange(self._signatures.count, self._signatures.count + len(kept_at))
        self._index.add(keys[kept_at].ravel(), np.repeat(ordinals, len(self._bands)))
        self._signatures.append([line for line, _ in kept], signatures[kept_at])
        return kept

    def _earlier_match(self, signature: np.ndarray, ordinals: set[int]) -> int | None:
        """The line of the first row kept in an earlier batch that this signature matches."""
        for ordinal in sorted(ordinals):
            line, other = self._signatures.read(ordinal)
            if self._similar(signature, other):
                return line
        return None

    def _similar(self, signature: np.ndarray, other: np.ndarray) -> bool:
        return float(np.mean(signature == other)) >= self.threshold

    def close(self) -> None:
        self._index.close()
        self._signatures.close()
        self._folder.cleanup()
