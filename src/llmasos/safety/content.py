"""The built-in unsafe-content guard: a weighted lexicon over the Llama Guard 3 taxonomy (S1-S14).

It is a lexicon, not a model, and it says so: each category has weighted patterns for its topics
("pipe bomb", "launder money", "kill myself"), and every sentence that matches one is scored by a
logistic over three kinds of evidence, read in the sentence and its neighbours:

- topic: the patterns that matched (the strongest weight counts, and a little for each other one);
- intent: cues of an operational request ("how do I make", "step by step", "without getting
  caught"), which turn a mention into a request;
- dampening: cues of a non-operational interest (the history of, how to protect against, what
  should I do if I was), which turn a request back into a question.

The harmless senses of harmful words ("kill a Python process", "bath bomb", "suicide prevention")
are blanked out before topics are matched. The weights are set so that a topic alone stays below
an even bet and a topic asked for as instructions is well above it; they are hand-set, not fitted,
so the scores are calibrated only in that rough sense. What gets past a lexicon (paraphrase, slang,
other languages, a request spread over a conversation) is the judge layer's job (judge.py).

Why not a library: the guard libraries that classify content (LLM Guard, NeMo Guardrails, Detoxify)
run downloaded models, and this layer must work offline with none. The lexicon is data
(data/unsafe_content.yaml) so that a deployment can extend it with its own file.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llmasos.errors import LLMasOSError
from llmasos.safety.findings import CATEGORIES, Finding
from llmasos.templates import read_yaml

LEXICON_FILE = Path(__file__).with_name("data") / "unsafe_content.yaml"
BIAS = -3.0  # the prior log-odds of a sentence that matched a topic: most mentions are harmless
EXTRA_WEIGHT = 0.5  # each further distinct pattern adds this much, for at most MAX_EXTRA of them
MAX_EXTRA = 2
# A sentence ends at . ! or ? before whitespace (so "os.system" and "3.5" do not end one) or at a
# newline; the lazy repeat keeps the scan linear.
SENTENCE = re.compile(r"\S[^\n]*?(?:[.!?]+(?=\s|$)|(?=\n)|$)")

Weighted = tuple[tuple[float, re.Pattern], ...]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """The sentences of `text`, as (start, end) offsets without the whitespace between them."""
    return [match.span() for match in SENTENCE.finditer(text)]


def combined(weights: Iterable[float]) -> float:
    """The strongest weight, plus a little for each other piece of evidence (at most MAX_EXTRA)."""
    ordered = sorted(weights, reverse=True)
    return ordered[0] + EXTRA_WEIGHT * min(len(ordered) - 1, MAX_EXTRA) if ordered else 0.0


@dataclass(frozen=True)
class Lexicon:
    """The patterns of data/unsafe_content.yaml, compiled: see that file for what each part does."""

    categories: dict[str, Weighted]
    intent: Weighted
    dampen: Weighted
    benign: tuple[re.Pattern, ...]

    @classmethod
    def load(cls, path: Path | str = LEXICON_FILE) -> Lexicon:
        path = Path(path)
        data = read_yaml(path, "the content lexicon (see llmasos/safety/data/unsafe_content.yaml)")
        if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
            raise LLMasOSError(
                f"the content lexicon {path} must map 'categories' (and optionally 'intent', 'dampen', "
                "'benign') to lists of [weight, pattern]; see llmasos/safety/data/unsafe_content.yaml"
            )
        unknown = sorted(set(data["categories"]) - CATEGORIES.keys())
        if unknown:
            raise LLMasOSError(
                f"the content lexicon {path} names unknown categories {unknown}; "
                f"known categories: {', '.join(CATEGORIES)}"
            )
        return cls(
            categories={
                category: _weighted(entries, f"{path}: {category}")
                for category, entries in data["categories"].items()
            },
            intent=_weighted(data.get("intent") or [], f"{path}: intent"),
            dampen=_weighted(data.get("dampen") or [], f"{path}: dampen"),
            benign=tuple(_compile(p, f"{path}: benign") for p in data.get("benign") or []),
        )

    def mask(self, text: str) -> str:
        """`text` with its benign phrases blanked out (spaces, so the words around stay apart)."""
        for pattern in self.benign:
            text = pattern.sub(lambda m: " " * len(m.group()), text)
        return text


@dataclass(frozen=True)
class SentenceEvidence:
    """What the lexicon found in one sentence: per category the weights of its topic patterns that
    matched, the intent cues (by index, so a cue seen in two neighbours counts once) and the
    strongest dampening cue."""

    topics: tuple[tuple[str, tuple[float, ...]], ...]
    intent: tuple[tuple[int, float], ...]
    dampen: float


class ContentGuard:
    """The unsafe-content guard (see findings.Guard): one finding per sentence and category, its
    span the sentence and its score the lexicon's logistic (see the module docstring).

    Sentences are analysed one at a time, and the analyses of recent ones are remembered
    (`sentence_cache` of them, least recently used forgotten first), so the repeated checks of a
    growing stream analyse only its new sentences. It has no `holdback`: a sentence's score can
    change with the next sentence, so in a stream a finding usually covers text already sent, and
    the stream ends with "content_filter" whatever the policy's action."""

    def __init__(
        self, lexicon: Lexicon | Path | str | None = None, name: str = "content", sentence_cache: int = 1024
    ):
        self.lexicon = lexicon if isinstance(lexicon, Lexicon) else Lexicon.load(lexicon or LEXICON_FILE)
        self.name = name
        self.categories = tuple(self.lexicon.categories)
        self._evidence = functools.lru_cache(maxsize=sentence_cache)(self._evidence)

    def check(self, text: str) -> list[Finding]:
        sentences = sentence_spans(text)
        evidence = [self._evidence(text[start:end]) for start, end in sentences]
        findings = []
        for index, ((start, end), found) in enumerate(zip(sentences, evidence)):
            if not found.topics:
                continue
            window = evidence[max(index - 1, 0) : index + 2]
            intent = combined(dict(cue for e in window for cue in e.intent).values())
            dampen = max(e.dampen for e in window)
            for category, weights in found.topics:
                logit = BIAS + combined(weights) + intent - dampen
                findings.append(Finding(category, start, end, 1 / (1 + math.exp(-logit)), self.name))
        return findings

    def _evidence(self, sentence: str) -> SentenceEvidence:
        masked = self.lexicon.mask(sentence)
        topics = [
            (category, tuple(weight for weight, pattern in patterns if pattern.search(masked)))
            for category, patterns in self.lexicon.categories.items()
        ]
        return SentenceEvidence(
            topics=tuple((category, weights) for category, weights in topics if weights),
            intent=tuple(
                (index, weight)
                for index, (weight, pattern) in enumerate(self.lexicon.intent)
                if pattern.search(sentence)
            ),
            dampen=max((w for w, pattern in self.lexicon.dampen if pattern.search(sentence)), default=0.0),
        )


def _compile(pattern: object, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise LLMasOSError(f"{where}: a pattern must be a string, got {pattern!r}")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise LLMasOSError(f"{where}: the pattern {pattern!r} does not compile ({e})") from e


def _weighted(entries: object, where: str) -> Weighted:
    if not isinstance(entries, list):
        raise LLMasOSError(f"{where}: expected a list of [weight, pattern], got {entries!r}")
    weighted = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int | float)):
            raise LLMasOSError(f"{where}: each entry is [weight, pattern], got {entry!r}")
        weighted.append((float(entry[0]), _compile(entry[1], where)))
    return tuple(weighted)
