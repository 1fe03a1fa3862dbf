"""The built-in prompt-injection and jailbreak guard: the known families of attack, as patterns.

Direct injection comes in the user's own message; indirect injection hides in text the model is
given to read (a retrieved page, an e-mail, a tool's result) and addresses the model from there.
The families, each a few signals below:

- override: "ignore all previous instructions", "new instructions:", "your real task is";
- exfiltration: "reveal your system prompt", "repeat the text above starting with 'You are'";
- delimiters: fake chat-template tokens and tags ("<|im_start|>system", "</system>", "[INST]",
  "### Instruction:") that try to end the user's turn and open a system one;
- jailbreak personas: DAN ("do anything now"), developer mode, "an unfiltered AI without
  restrictions", the deceased-grandmother story;
- encoded payloads: base64 runs that decode to text are decoded and checked again (base64 of
  base64 too, to MAX_DEPTH); a finding inside becomes one over the encoded run, its score raised
  by ENCODED since hiding an instruction is itself a sign;
- addressed to the assistant: "Note to the AI:", "Assistant, you must now call ...", "do not tell
  the user", "send the conversation to ..." — ordinary in a user's own message, an attack in a
  document.

Each signal has two weights: one for the user's input (`check`) and one for retrieved or tool text
(`check_context`). A user may say "assistant, you must answer in French"; a web page has no business
addressing the assistant at all, so the same words weigh far more there. The signals that match in
one sentence combine by noisy-OR (1 - prod(1 - w)), as independent pieces of evidence; a finding
spans the sentence, so redacting it removes the instruction along with its trigger.

The signals are data (data/prompt_injection.yaml, read once), as the content guard's lexicon is,
so that a deployment can use its own file: `InjectionGuard(patterns=PATH)`.

Why not a library: LLM Guard's and Rebuff's detectors, like Meta's Prompt Guard, are downloaded
classifiers or services, and this layer must work offline with no model. A classifier such as
Prompt Guard plugs in as a judge.ClassifierJudge (labels INJECTION and JAILBREAK mapped here).
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from llmasos.errors import LLMasOSError
from llmasos.safety.content import sentence_spans
from llmasos.safety.findings import CATEGORIES, Finding
from llmasos.templates import read_yaml

PATTERNS_FILE = Path(__file__).with_name("data") / "prompt_injection.yaml"
MAX_DEPTH = 2  # base64 inside base64, and no deeper
ENCODED = 0.3  # what hiding a finding in base64 adds to its score (noisy-OR)
BASE64 = re.compile(r"(?<![\w+/=-])[A-Za-z0-9+/_-]{16,}={0,2}(?![\w+/=-])")
FRAGMENT = re.compile(r"\{([A-Za-z_]\w*)\}")  # {name} in a pattern; never a repeat such as {0,3}


@dataclass(frozen=True)
class Signal:
    """One pattern of attack and what it weighs in the user's input and in retrieved/tool text."""

    category: str
    pattern: re.Pattern
    user: float
    context: float


def load_signals(path: Path | str = PATTERNS_FILE) -> tuple[Signal, ...]:
    """The signals of a patterns file shaped like data/prompt_injection.yaml, compiled, in the
    file's order; every mistake in it is an LLMasOSError that names the file and the entry."""
    path = Path(path)
    data = read_yaml(path, "the injection patterns (see llmasos/safety/data/prompt_injection.yaml)")
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
        raise LLMasOSError(
            f"the injection patterns {path} must map 'categories' (and optionally 'fragments') to lists "
            "of [user weight, context weight, pattern]; see llmasos/safety/data/prompt_injection.yaml"
        )
    fragments = data.get("fragments") or {}
    if not isinstance(fragments, dict) or not all(isinstance(v, str) for v in fragments.values()):
        raise LLMasOSError(f"{path}: 'fragments' must map names to pattern strings")
    unknown = sorted(set(data["categories"]) - CATEGORIES.keys())
    if unknown:
        raise LLMasOSError(
            f"the injection patterns {path} name unknown categories {unknown}; "
            f"known categories: {', '.join(CATEGORIES)}"
        )
    signals = []
    for category, entries in data["categories"].items():
        where = f"{path}: {category}"
        if not isinstance(entries, list):
            raise LLMasOSError(f"{where}: expected a list of [user weight, context weight, pattern]")
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str)):
                raise LLMasOSError(
                    f"{where}: each entry is [user weight, context weight, pattern], got {entry!r}"
                )
            user, context, pattern = entry
            for weight in (user, context):
                if not (isinstance(weight, int | float) and 0 <= weight <= 1):
                    raise LLMasOSError(
                        f"{where}: weights are numbers from 0 to 1, got {weight!r} in {entry!r}"
                    )
            signals.append(Signal(category, _compile(pattern, fragments, where), float(user), float(context)))
    return tuple(signals)


def _compile(pattern: str, fragments: dict[str, str], where: str) -> re.Pattern:
    def fragment(match: re.Match) -> str:
        if match.group(1) not in fragments:
            raise LLMasOSError(f"{where}: the pattern {pattern!r} names no fragment {match.group(1)!r}")
        return fragments[match.group(1)]

    expanded = FRAGMENT.sub(fragment, pattern)
    try:
        return re.compile(expanded, re.IGNORECASE)
    except re.error as e:
        raise LLMasOSError(f"{where}: the pattern {pattern!r} does not compile ({e})") from e


@functools.cache
def builtin_signals() -> tuple[Signal, ...]:
    """The built-in patterns, read once per process however many guards are built."""
    return load_signals(PATTERNS_FILE)


def noisy_or(weights) -> float:
    """The chance that at least one piece of evidence is right, each taken as independent."""
    return 1.0 - math.prod(1.0 - w for w in weights)


class InjectionGuard:
    """The prompt-injection and jailbreak guard (see findings.Guard): `check(text)` for the user's
    own input (and the model's output), `check_context(text)` for text that did not come from the
    user, a retrieved document or a tool's result (GuardPipeline.check_context calls it).

    Sentences are checked one at a time, and the findings of recent ones are remembered
    (`sentence_cache` of them, least recently used forgotten first), so the repeated checks of a
    growing stream check only its new sentences."""

    def __init__(
        self, patterns: Path | str | None = None, name: str = "injection", sentence_cache: int = 1024
    ):
        self.signals = builtin_signals() if patterns is None else load_signals(patterns)
        self.categories = tuple(dict.fromkeys(signal.category for signal in self.signals))
        self.name = name
        self._sentence = functools.lru_cache(maxsize=sentence_cache)(self._sentence)

    def check(self, text: str) -> list[Finding]:
        return self._scan(text, context=False, depth=0)

    def check_context(self, text: str) -> list[Finding]:
        return self._scan(text, context=True, depth=0)

    def _scan(self, text: str, context: bool, depth: int) -> list[Finding]:
        return [
            Finding(category, start + begin, start + end, score, self.name)
            for start, stop in sentence_spans(text)
            for category, begin, end, score in self._sentence(text[start:stop], context, depth)
        ]

    def _sentence(self, sentence: str, context: bool, depth: int) -> tuple[tuple[str, int, int, float], ...]:
        """The findings of one sentence, as (category, start, end, score) within it: per category
        the noisy-OR of its signals over the whole sentence, and the base64 runs that hide one."""
        weights: dict[str, list[float]] = {}
        for signal in self.signals:
            weight = signal.context if context else signal.user
            if weight > 0 and signal.pattern.search(sentence):
                weights.setdefault(signal.category, []).append(weight)
        found = [(category, 0, len(sentence), noisy_or(ws)) for category, ws in weights.items()]
        for match in BASE64.finditer(sentence) if depth < MAX_DEPTH else ():
            decoded = decode_base64(match.group())
            inner = self._scan(decoded, context, depth + 1) if decoded else []
            for category in dict.fromkeys(f.category for f in inner):
                score = max(f.score for f in inner if f.category == category)
                found.append((category, *match.span(), noisy_or([score, ENCODED])))
        return tuple(found)


def decode_base64(run: str) -> str | None:
    """The text a base64 (or URL-safe base64) run encodes, or None when it is not prose (with a
    space) or base64 again: most long runs of letters and digits (hashes, keys, identifiers) decode
    to bytes that are not UTF-8, and the rest to strings without a space."""
    body = run.rstrip("=")
    if len(body) % 4 == 1:
        return None
    altchars = b"-_" if ("-" in body or "_" in body) else None
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=altchars, validate=True)
        decoded = raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in decoded)
    text = " " in decoded or BASE64.fullmatch(decoded)
    return decoded if text and printable >= 0.95 * len(decoded) else None
