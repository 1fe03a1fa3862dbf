"""The guard pipeline: run every guard on a text, let the policy decide, redact or block.

Findings that overlap (an e-mail inside a secret assignment, a phone number inside a card
candidate) become one span: the union of them, under the strictest action among them, so no
part of any finding is ever left showing. A pipeline is cheap to build: the guards are shared,
and a server builds one per request with the policy, vault owner and salt of that request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llmasos.errors import LLMasOSError
from llmasos.safety.findings import ACTIONS, Action, Finding, Guard, Verdict, strictest
from llmasos.safety.policy import Policy
from llmasos.safety.redaction import Redactor, Vault


@dataclass(frozen=True)
class Span:
    """One stretch of text to act on: the union of overlapping findings and its strictest action
    (the category is that of the finding that action comes from)."""

    start: int
    end: int
    category: str
    action: Action


class GuardPipeline:
    """Guards under one policy: `check_input` and `check_output` return a Verdict. `vault` and
    `owner` serve reversible redaction; `salt` the hash style (default: one per process)."""

    def __init__(
        self,
        guards: Sequence[Guard],
        policy: Policy,
        *,
        vault: Vault | None = None,
        owner: str | None = None,
        salt: bytes | None = None,
    ):
        names = [guard.name for guard in guards]
        if len(set(names)) != len(names):
            raise LLMasOSError(f"two guards share a name in {names}; the audit log tells guards apart by it")
        self.guards = tuple(guards)
        self.policy = policy
        self._redactor_options = dict(vault=vault, owner=owner, salt=salt)
        self.redactor()  # a reversible policy without a vault fails here, not on the first finding

    def redactor(self) -> Redactor:
        """Fresh numbering, for one text or one stream."""
        return Redactor(self.policy.redaction, **self._redactor_options)

    def findings(self, text: str, context: bool = False) -> list[Finding]:
        """Every guard's findings at or above the policy's min_score, in text order. `context` marks
        text that did not come from the user (see check_context): a guard with `check_context`
        checks it as such, the others as any text."""
        found = [
            f for guard in self.guards for f in _run(guard, text, context) if f.score >= self.policy.min_score
        ]
        return sorted(found, key=lambda f: (f.start, -f.end))

    def spans(self, findings: Sequence[Finding]) -> list[Span]:
        """Findings (in text order) merged into disjoint spans, left to right."""
        spans: list[Span] = []
        for f in findings:
            action = self.policy.action_for(f.category)
            if spans and f.start < spans[-1].end:
                last = spans[-1]
                stricter = ACTIONS.index(action) > ACTIONS.index(last.action)
                spans[-1] = Span(
                    last.start,
                    max(last.end, f.end),
                    f.category if stricter else last.category,
                    action if stricter else last.action,
                )
            else:
                spans.append(Span(f.start, f.end, f.category, action))
        return spans

    def actions(self, findings: Sequence[Finding]) -> dict[str, Action]:
        return {f.category: self.policy.action_for(f.category) for f in findings}

    def check_input(self, text: str) -> Verdict:
        return self._check(text, "input")

    def check_output(self, text: str) -> Verdict:
        """The whole output at once; a streamed output goes through stream.StreamGuard."""
        return self._check(text, "output")

    def check_context(self, text: str) -> Verdict:
        """A retrieved document or a tool's result, before it joins the prompt: input that did not
        come from the user, where words addressed to the model are an attack (indirect injection)."""
        return self._check(text, "input", context=True)

    def _check(self, text: str, stage: Literal["input", "output"], context: bool = False) -> Verdict:
        findings = self.findings(text, context)
        actions = self.actions(findings)
        action = strictest(actions.values())
        shown = "" if action == "block" else redact(text, self.spans(findings), self.redactor())
        return Verdict(action, tuple(findings), shown, actions, stage)


def _run(guard: Guard, text: str, context: bool) -> list[Finding]:
    return guard.check_context(text) if context and hasattr(guard, "check_context") else guard.check(text)


def redact(
    text: str, spans: Sequence[Span], redactor: Redactor, start: int = 0, end: int | None = None
) -> str:
    """text[start:end] with the spans inside it that the policy redacts or blocks replaced."""
    end = len(text) if end is None else end
    pieces, cursor = [], start
    for span in spans:
        if span.action == "allow" or span.start < start or span.end > end:
            continue
        pieces += [
            text[cursor : span.start],
            redactor.replacement(span.category, text[span.start : span.end]),
        ]
        cursor = span.end
    return "".join(pieces) + text[cursor:end]
