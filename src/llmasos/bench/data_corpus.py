"""The corpus of `llmasos bench data`: JSONL of a given size, seeded, with what a cleaning recipe
must find planted in it and listed (so a test can check that exactly those are found).

Documents are prose of pseudo-words drawn with Zipf weights and English stop words, one sentence
per line, so datatrove's Gopher and FineWeb filters keep them; a few are low quality (word lists
without punctuation) for those filters to drop. Planted among them:
- exact duplicates: an earlier document again, verbatim;
- near duplicates: an earlier document with about 1 word in 200 replaced (5-gram Jaccard ~0.95);
- PII: an e-mail address, a phone number or a credit card number in a sentence.
Copies are drawn from the last few hundred documents, so the generator's memory stays bounded.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STOP_WORDS = ("the", "of", "and", "to", "in", "a", "is", "that", "with", "for", "it", "as", "on", "be")
_SYLLABLES = ("ka", "lo", "mi", "re", "tu", "sa", "ne", "vo", "ri", "da", "pe", "zu", "an", "el", "or")
PII = (
    "write to {first}.{last}{n}@example.org for details",
    "call {first} on +1 415-555-{n:04d} after noon",
    "the card 4111 1111 1111 1111 was charged by {first}",
)


@dataclass
class CorpusPlan:
    """What was written: rows, bytes, and the ids (the `id` column) of every planted case."""

    rows: int = 0
    bytes: int = 0
    exact_duplicates: list[int] = field(default_factory=list)
    near_duplicates: list[int] = field(default_factory=list)
    pii: list[int] = field(default_factory=list)
    low_quality: list[int] = field(default_factory=list)


@dataclass
class CorpusShape:
    """How much of each kind to plant (fractions of the rows) and how long documents are."""

    exact: float = 0.05
    near: float = 0.05
    pii: float = 0.05
    low_quality: float = 0.03
    words: tuple[int, int] = (200, 900)  # per document, uniform
    vocabulary: int = 20000
    seed: int = 0


def write_corpus(path: Path, size_bytes: int, shape: CorpusShape | None = None) -> CorpusPlan:
    """Write documents to `path` until it holds at least `size_bytes`."""
    shape = shape or CorpusShape()
    rng = np.random.default_rng(shape.seed)
    vocabulary = _vocabulary(rng, shape.vocabulary)
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)
    weights /= weights.sum()
    recent: deque[str] = deque(maxlen=500)
    plan = CorpusPlan()
    with open(path, "w", encoding="utf-8") as f:
        while plan.bytes < size_bytes:
            kind = rng.random()
            doc_id = plan.rows
            if recent and kind < shape.exact:
                text = recent[rng.integers(len(recent))]
                plan.exact_duplicates.append(doc_id)
            elif recent and kind < shape.exact + shape.near:
                text = _perturb(rng, recent[rng.integers(len(recent))], vocabulary)
                plan.near_duplicates.append(doc_id)
            elif kind < shape.exact + shape.near + shape.low_quality:
                text = "\n".join(" ".join(rng.choice(vocabulary, 3)) for _ in range(rng.integers(20, 60)))
                plan.low_quality.append(doc_id)
            else:
                text = _prose(rng, vocabulary, weights, int(rng.integers(*shape.words)))
                if kind > 1 - shape.pii:
                    text = _with_pii(rng, text, vocabulary)
                    plan.pii.append(doc_id)
                recent.append(text)
            line = json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            plan.rows += 1
            plan.bytes += len(line.encode())
    return plan


def _vocabulary(rng: np.random.Generator, size: int) -> np.ndarray:
    """Distinct pseudo-words of 2-4 syllables, the stop words first (the most frequent)."""
    words = dict.fromkeys(STOP_WORDS)
    while len(words) < size:
        parts = rng.choice(_SYLLABLES, size=(size, 4))
        lengths = rng.integers(2, 5, size)
        for row, n in zip(parts, lengths):
            words["".join(row[:n])] = None
    return np.array(list(words)[:size])


def _prose(rng: np.random.Generator, vocabulary: np.ndarray, weights: np.ndarray, n: int) -> str:
    tokens = rng.choice(vocabulary, size=n, p=weights)
    lines, start = [], 0
    while start < n:
        end = min(n, start + int(rng.integers(8, 20)))
        sentence = " ".join(tokens[start:end])
        lines.append(sentence[:1].upper() + sentence[1:] + ".")
        start = end
    return "\n".join(lines)


def _perturb(rng: np.random.Generator, text: str, vocabulary: np.ndarray) -> str:
    tokens = text.split(" ")
    for i in rng.integers(0, len(tokens), max(1, len(tokens) // 200)):
        tokens[i] = str(rng.choice(vocabulary[len(STOP_WORDS) :]))
    return " ".join(tokens)


def _with_pii(rng: np.random.Generator, text: str, vocabulary: np.ndarray) -> str:
    first, last = rng.choice(vocabulary[len(STOP_WORDS) :], 2)
    template = PII[int(rng.integers(len(PII)))]
    sentence = template.format(first=first, last=last, n=int(rng.integers(10000)))
    return f"{text}\n{sentence.capitalize()}."
