"""LLMasOS's own steps: PII and secrets scrubbing with the safety guards, decontamination against
evaluation data, and chat-format checks for fine-tuning data."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from llmasos.data.pipeline.steps import Step, words
from llmasos.errors import LLMasOSError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Scrub(Step):
    """PII and secrets found by llmasos.safety's guards: redacted in place, or the row dropped
    (action "block"); counted per category."""

    pipeline: object = None  # a safety GuardPipeline

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        kept = []
        for line, row in rows:
            verdict = self.pipeline.check_input(self.text(row, line))
            for finding in verdict.findings:
                self.counts[f"found:{finding.category}"] += 1
            if verdict.action == "block":
                self.counts["removed:blocked"] += 1
                continue
            if verdict.findings:
                self.counts["redacted_rows"] += 1
                row = {**row, self.column: verdict.text}
            kept.append((line, row))
        return kept


def scrub(column: str, action: str, style: str) -> Scrub:
    from llmasos.safety import GuardPipeline, Policy, pii_guard, secrets_guard

    policy = Policy(default_action=action, redaction=style)
    return Scrub("scrub", column, pipeline=GuardPipeline([pii_guard(), secrets_guard()], policy))


def all_text(value: object) -> str:
    """Every string inside a row (chat messages' contents too), joined: what decontamination reads."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "\n".join(all_text(v) for v in value.values())
    if isinstance(value, list):
        return "\n".join(all_text(v) for v in value)
    return ""


def ngrams(text: str, n: int) -> Iterable[tuple[str, ...]]:
    tokens = words(text)
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


@dataclass
class Decontaminate(Step):
    """Drop rows that share an n-gram (13 words by default, as GPT-3 and lm-evaluation-harness
    measure contamination) with the evaluation data; report which source and n-gram matched."""

    ngram: int = 13
    index: dict = field(default_factory=dict)  # hash(n-gram) -> the evaluation source it came from

    def add_source(self, label: str, texts: Iterable[str]) -> None:
        for text in texts:
            for gram in ngrams(text, self.ngram):
                self.index.setdefault(hash(gram), label)

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        kept = []
        for line, row in rows:
            text = all_text(row) if self.column == "*" else self.text(row, line)
            hit = next((g for g in ngrams(text, self.ngram) if hash(g) in self.index), None)
            if hit is None:
                kept.append((line, row))
                continue
            source = self.index[hash(hit)]
            self.counts[f"removed:{source}"] += 1
            self.note(f"line {line} shares '{' '.join(hit)}' with {source}")
        return kept


@dataclass
class ChatFormat(Step):
    """Conversations checked for fine-tuning: a list of {role, content}, known roles, a system
    message only first, user and assistant alternating (tool results after an assistant turn), no
    empty turn, ending with the assistant. Bad rows are dropped, or fail the run (`action: fail`)."""

    action: str = "drop"

    def __call__(self, rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        kept = []
        for line, row in rows:
            problem = chat_problem(row.get(self.column))
            if problem is None:
                kept.append((line, row))
                continue
            message = f"line {line}: {problem}"
            if self.action == "fail":
                raise LLMasOSError(f"step chat_format: {message}; fix the data or use `action: drop`")
            self.counts[f"removed:{problem.split(':')[0]}"] += 1
            self.note(message)
        return kept


def chat_problem(messages: object) -> str | None:
    """What is wrong with one conversation (its first problem), or None."""
    if not isinstance(messages, list) or not messages:
        return "not a conversation: expected a non-empty list of {role, content}"
    previous = None
    for turn, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"bad message: turn {turn} needs a role and a string content"
        role = message.get("role")
        if role not in ROLES:
            return f"unknown role: turn {turn} has role {role!r} (roles: {', '.join(ROLES)})"
        if not message["content"].strip():
            return f"empty turn: turn {turn} ({role}) has no content"
        if role == "system" and turn != 1:
            return f"misplaced system: turn {turn} is a system message after the first turn"
        allowed = {None: {"system", "user"}, "system": {"user"}, "user": {"assistant"},
                   "assistant": {"user", "tool"}, "tool": {"assistant", "tool"}}[previous]  # fmt: skip
        if role not in allowed:
            return f"no alternation: turn {turn} ({role}) follows {previous or 'the start'}"
        previous = role
    if previous != "assistant":
        return f"no answer: the conversation ends with {previous}, not assistant"
    return None
