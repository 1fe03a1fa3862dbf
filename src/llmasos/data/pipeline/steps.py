"""What a step of `data prepare` is, and the filtering steps: datatrove's quality filters, exact and
MinHash near-duplicate removal.

A step takes a batch of rows and returns the rows it keeps (possibly changed), counting why it
dropped the others in `counts`, so the pipeline streams: memory is one batch plus what a step must
remember across batches (the dedup steps' hashes: O(rows), a few bytes to ~1 KiB a row).

Quality filters are datatrove's own classes (GopherQualityFilter, GopherRepetitionFilter,
C4QualityFilter, FineWebQualityFilter), called per document with their reasons as counts. Two of
datatrove's steps are not used, and why:
- LanguageFilter downloads a fastText model from the hub on first use; this platform must work
  offline, so language id is not a step here (yet).
- datatrove's MinHash dedup is four out-of-core stages (signatures, buckets, clusters, filter) over
  folders of files, run by an executor; a streamed step over the store's batches is simpler with
  datasketch's MinHash + LSH (the library datatrove's own docs compare against), at the cost of an
  in-memory index: num_perm * 8 bytes per row kept.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

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


def quality_filter(step: str, column: str, options: dict) -> QualityFilter:
    import inspect

    filters = needs("datatrove.pipeline.filters", step)
    cls = getattr(filters, QUALITY_FILTERS[step])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "exclusion_writer"}
    for key in options:
        if key not in accepted:
            raise LLMasOSError(
                f"step {step}: unknown field '{key}' (datatrove's {cls.__name__} takes "
                f"{', '.join(sorted(accepted))})"
            )
    try:
        return QualityFilter(step, column, filter=cls(**options))
    except (TypeError, ValueError) as e:
        raise LLMasOSError(f"step {step}: {e}") from e


@dataclass
class ExactDedup(Step):
    """Drop rows whose text, case and whitespace aside, was seen before (8-byte hashes kept)."""

    seen: set = field(default_factory=set)

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        kept = []
        for line, row in rows:
            key = hashlib.blake2b(" ".join(words(self.text(row, line))).encode(), digest_size=8)
            if key.digest() in self.seen:
                self.counts["removed:duplicate"] += 1
            else:
                self.seen.add(key.digest())
                kept.append((line, row))
        return kept


@dataclass
class NearDedup(Step):
    """Drop rows whose word n-gram set has an estimated Jaccard similarity >= threshold with a row
    kept earlier: LSH finds candidates, their MinHash signatures confirm (so the threshold holds)."""

    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    _lsh: object = None
    _signatures: dict = field(default_factory=dict)

    def __post_init__(self):
        datasketch = needs("datasketch", self.name)
        self._lsh = datasketch.MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        from datasketch import MinHash

        shingles = []
        for line, row in rows:
            tokens = words(self.text(row, line))
            starts = range(max(1, len(tokens) - self.ngram + 1))
            grams = {" ".join(tokens[j : j + self.ngram]) for j in starts}
            shingles.append([g.encode() for g in grams])
        kept = []
        for (line, row), signature in zip(rows, MinHash.bulk(shingles, num_perm=self.num_perm)):
            match = next((c for c in self._lsh.query(signature) if self._similar(signature, c)), None)
            if match is not None:
                self.counts["removed:near_duplicate"] += 1
                self.note(f"line {line} ~ line {match}")
                continue
            self._lsh.insert(line, signature)
            self._signatures[line] = signature
            kept.append((line, row))
        return kept

    def _similar(self, signature, candidate: int) -> bool:
        return signature.jaccard(self._signatures[candidate]) >= self.threshold
