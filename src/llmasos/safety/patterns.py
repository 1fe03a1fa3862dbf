"""A guard made of patterns: each recognizer is a regular expression that proposes candidates and
a check that keeps the real ones (a checksum, a library's validation, the context).

The same compiled pattern finds and holds back. Patterns use the `regex` module rather than `re`
for its partial matching: on the text streamed so far, a partial match at the end is a candidate
that the next tokens may complete, and a complete match that ends within HOLD_MARGIN characters of
the end may still grow or be rejected by a lookahead (an e-mail's domain ".co" + "m", an IP's
".4" + ".5"). Holding back from the start of either is what lets a stream emit text before the
generation ends without ever emitting part of a finding. This needs one discipline of a pattern:
it reads at most HOLD_MARGIN characters past the end of a match (lookaheads, optional suffixes,
greedy repeats that give back), and its spans lie within its match.

Most recognizers are line-local (their matches never contain a newline), so a text is scanned
line by line, as detect-secrets does, and only the unfinished last line can hold a stream back.

A recognizer may name keywords, as gitleaks' rules do: it runs only on a line that holds one of
them (case-insensitively), which spares most of a secrets guard's rules on most lines. For a
stream, a line that ends in the beginning of a keyword counts too ("...gh" may become "ghp_"). That
is safe only if a keyword occurs in every match at or before the start of its spans: text before
the keyword may be emitted before the keyword arrives, and must hold no part of a finding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import regex

from llmasos.errors import LLMasOSError
from llmasos.safety.findings import CATEGORIES, Finding

HOLD_MARGIN = 16

SpanFinder = Callable[[regex.Match], Iterable[tuple[int, int]]]


def whole_match(match: regex.Match) -> list[tuple[int, int]]:
    return [match.span()]


def accept(predicate: Callable[[regex.Match], bool], group: int = 0) -> SpanFinder:
    """A span finder keeping match.group(group) when predicate(match) holds."""

    def spans(match: regex.Match) -> list[tuple[int, int]]:
        return [match.span(group)] if predicate(match) else []

    return spans


@dataclass(frozen=True)
class Recognizer:
    """One kind of finding: candidates from `pattern`, real ones (spans inside the match, relative
    to match.string) from `spans`. A line-local pattern sees one line as match.string."""

    category: str
    pattern: regex.Pattern
    score: float
    spans: SpanFinder = whole_match
    line_local: bool = True
    keywords: tuple[str, ...] = ()  # lower case; none: the recognizer runs on every text


class PatternGuard:
    """A guard (see findings.Guard) running recognizers over a text, streamable by `holdback`.

    A stream checks its whole text again and again as it grows, so the findings of recent lines
    are remembered (`line_cache` lines, least recently used forgotten first): each check then
    scans the unfinished last line, not the whole text. Those lines stay in memory until pushed
    out; line_cache=0 keeps none, at the cost of rescanning."""

    def __init__(self, name: str, recognizers: Sequence[Recognizer], line_cache: int = 1024):
        unknown = sorted({r.category for r in recognizers} - CATEGORIES.keys())
        if unknown:
            raise LLMasOSError(f"guard {name!r} reports unknown categories {unknown}; add them to CATEGORIES")
        self.name = name
        self.recognizers = tuple(recognizers)
        self.categories = tuple(dict.fromkeys(r.category for r in recognizers))
        self._line_local = tuple(r for r in self.recognizers if r.line_local)
        self._whole_text = tuple(r for r in self.recognizers if not r.line_local)
        self._scan_line = functools.lru_cache(maxsize=line_cache)(self._scan_line)
        self._line_filter = _Prefilter(self._line_local)
        self._text_filter = _Prefilter(self._whole_text)

    def check(self, text: str) -> list[Finding]:
        found = list(_scan(self._text_filter.candidates(text), text))
        offset = 0
        for line in text.split("\n"):
            found += [
                (category, offset + start, offset + end, score)
                for category, start, end, score in self._scan_line(line)
            ]
            offset += len(line) + 1
        findings = [Finding(category, start, end, score, self.name) for category, start, end, score in found]
        return sorted(findings, key=lambda f: (f.start, -f.end))

    def holdback(self, text: str, start: int = 0) -> int:
        """Where the still-unsettled tail of `text` starts: the earliest candidate that the next
        characters could complete, extend or reject (len(text) when there is none). Candidates
        before `start` were settled by an earlier call on a prefix of `text`, and stay settled."""
        last_line = text.rfind("\n") + 1
        hold = len(text)
        candidates = [
            *self._line_filter.candidates(text[last_line:], unfinished=True),
            *self._text_filter.candidates(text, unfinished=True),
        ]
        for recognizer in candidates:
            offset = last_line if recognizer.line_local else 0
            unsettled = _unsettled_start(recognizer.pattern, text[offset:], max(start - offset, 0))
            if unsettled is not None:
                hold = min(hold, offset + unsettled)
        return hold

    def _scan_line(self, line: str) -> tuple[tuple[str, int, int, float], ...]:
        return tuple(_scan(self._line_filter.candidates(line), line))


class _Prefilter:
    """Which of some recognizers a text's keywords call for (see the module doc)."""

    def __init__(self, recognizers: Sequence[Recognizer]):
        self.recognizers = recognizers
        self.keywords = tuple(sorted({k for r in recognizers for k in r.keywords}))
        self.starts: dict[str, set[str]] = {}  # a proper prefix of keywords -> those keywords
        for keyword in self.keywords:
            for i in range(1, len(keyword)):
                self.starts.setdefault(keyword[:i], set()).add(keyword)
        self.longest = max(map(len, self.keywords), default=0)

    def candidates(self, text: str, unfinished: bool = False) -> Sequence[Recognizer]:
        """The recognizers whose keywords `text` holds (or, `unfinished`, may be completing)."""
        if not self.keywords:
            return self.recognizers
        lowered = text.lower()
        present = {k for k in self.keywords if k in lowered}
        if unfinished:
            tail = lowered[-self.longest :]
            for i in range(1, len(tail) + 1):
                present |= self.starts.get(tail[-i:], set())
        return [r for r in self.recognizers if not r.keywords or not present.isdisjoint(r.keywords)]


def _scan(recognizers: Sequence[Recognizer], text: str) -> Iterable[tuple[str, int, int, float]]:
    for recognizer in recognizers:
        for match in recognizer.pattern.finditer(text):
            for start, end in recognizer.spans(match):
                if end > start:
                    yield recognizer.category, start, end, recognizer.score


def _unsettled_start(pattern: regex.Pattern, text: str, pos: int) -> int | None:
    """The first start from `pos` on of a partial match, or of a complete one within HOLD_MARGIN of
    the end. Every start is tried (overlapped), as a scan from the line's start could reach any."""
    for match in pattern.finditer(text, pos, partial=True, overlapped=True):
        if match.partial and match.end() > match.start():  # an empty one at the very end holds nothing
            return match.start()
        if not match.partial and match.end() > len(text) - HOLD_MARGIN:
            return match.start()
    return None
