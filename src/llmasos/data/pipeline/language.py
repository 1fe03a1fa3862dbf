"""The `language_id` step: each row's language and score, recorded as the columns `language` and
`language_score` (the names datatrove's LanguageFilter writes into a document's metadata), and the
rows not in the languages kept, or identified with too low a score, dropped.

datatrove's LanguageFilter is not used: its backends (fastText's lid.176 and GlotLID) download their
model from the hub on first use, and this platform works offline. py3langid (a maintained fork of
langid.py; ISO 639-1 codes) ships its model inside the wheel; its probabilities are
normalized over the languages (`norm_probs`), so `min_score` reads as datatrove's
`language_threshold` does (default 0.65, as there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import pyarrow as pa

from llmasos.data.pipeline.steps import Step, needs
from llmasos.errors import LLMasOSError

COLUMNS = (pa.field("language", pa.string()), pa.field("language_score", pa.float64()))


@lru_cache(maxsize=1)
def identifier():
    """py3langid's identifier with normalized probabilities (its model loads in ~1 s: once a process)."""
    langid = needs("py3langid.langid", "language_id")
    return langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)


def check_languages(languages: list[str]) -> None:
    """An error naming the codes the identifier does not know, and the codes it does."""
    known = set(identifier().nb_classes)
    unknown = [code for code in languages if code not in known]
    if unknown:
        raise LLMasOSError(
            f"field 'languages': unknown code(s) {', '.join(map(str, unknown))}; use ISO 639-1 codes "
            f"py3langid knows: {', '.join(sorted(known))}"
        )


@dataclass
class LanguageId(Step):
    """Identify each row's language; keep rows in `languages` (any language when empty) whose score
    is at least `min_score`. Dropped rows are counted by the language found (`removed:language_xx`)
    or as `removed:low_score`."""

    languages: list[str] = field(default_factory=list)
    min_score: float = 0.65

    def columns(self) -> tuple[pa.Field, ...]:
        return COLUMNS

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        classify = identifier().classify
        kept = []
        for line, row in rows:
            language, score = classify(self.text(row, line))
            score = round(float(score), 4)
            if self.languages and language not in self.languages:
                self.counts[f"removed:language_{language}"] += 1
            elif score < self.min_score:
                self.counts["removed:low_score"] += 1
            else:
                kept.append((line, {**row, "language": language, "language_score": score}))
        return kept
