"""Guarding a streamed output: emit what is settled, hold back what could still be a finding.

Each delta is appended to the text so far, the guards run on all of it, and the text is emitted
up to the hold point: the earliest place where a guard's `holdback` says a finding could still
begin (an unfinished e-mail, card number, key), moved back to the start of any span that reaches
past it. What is emitted is redacted exactly as `GuardPipeline.check_output` would redact the
whole text, one placeholder numbering for the stream, so the pieces add up to that redaction,
and no part of a redacted value is ever sent.

A span the policy blocks ends the stream once it is settled: the text before it is emitted and
the caller ends the stream with finish_reason "content_filter". So does a finding over text that
was already sent (only possible from a guard without `holdback`): nothing can be taken back, so
the stream stops there rather than go on.
"""

from __future__ import annotations

from llmasos.errors import LLMasOSError
from llmasos.safety.findings import Verdict, strictest
from llmasos.safety.pipeline import GuardPipeline, redact


class StreamGuard:
    """One streamed output: `feed(delta)` returns the text safe to send now, `finish()` the rest.
    After `blocked` turns true both return "" and the caller ends the stream.

    Checking costs a scan of the unfinished last line, so it runs once `interval` characters have
    arrived since the last check rather than at every delta, and on a long line once an eighth of
    the line has (at most MAX_INTERVAL characters): the scans of a line then add up to a few times
    its length instead of growing with its square, for a little latency (the PII guard holds the
    last word back anyway)."""

    MAX_INTERVAL = 64

    def __init__(self, pipeline: GuardPipeline, interval: int = 8):
        if interval < 1:
            raise LLMasOSError(f"a stream's check interval is at least 1 character, got {interval}")
        self.pipeline = pipeline
        self.interval = interval
        self.blocked = False
        self._redactor = pipeline.redactor()
        self._text = ""
        self._settled = 0  # text[:_settled] has been emitted (redacted)
        self._checked = 0  # len(text) at the last check
        self._emitted: list[str] = []
        self._applied: set[tuple[int, int]] = set()  # spans redacted in what was emitted
        self._finished = False

    @property
    def finish_reason(self) -> str | None:
        """ "content_filter" once blocked: the finish_reason the stream must end with."""
        return "content_filter" if self.blocked else None

    def feed(self, delta: str) -> str:
        if self._finished:
            raise LLMasOSError("this stream was finished; feed a new StreamGuard for a new output")
        self._text += delta
        line = len(self._text) - self._text.rfind("\n", 0, self._checked) - 1  # the unfinished line so far
        every = max(self.interval, min(line // 8, self.MAX_INTERVAL))
        if len(self._text) - self._checked < every:
            return ""
        return self._advance(final=False)

    def finish(self) -> str:
        """The generation ended: nothing more can complete a finding, so the rest is settled."""
        if self._finished:
            return ""
        self._finished = True
        return self._advance(final=True)

    def verdict(self) -> Verdict:
        """The stream's verdict for the audit log, over everything fed; its text is what was sent."""
        findings = self.pipeline.findings(self._text)
        actions = self.pipeline.actions(findings)
        action = "block" if self.blocked else strictest(actions.values())
        return Verdict(action, tuple(findings), "".join(self._emitted), actions, "output")

    def _advance(self, final: bool) -> str:
        if self.blocked:
            return ""
        text = self._text
        self._checked = len(text)
        spans = self.pipeline.spans(self.pipeline.findings(text))
        if any(
            s.action != "allow" and s.start < self._settled and (s.start, s.end) not in self._applied
            for s in spans
        ):
            self.blocked = True  # a finding over text already sent: stop here
            return ""
        hold = len(text) if final else self._holdback(text)
        for span in spans:
            if span.start < hold < span.end:
                hold = span.start
        blocking = next((s for s in spans if s.action == "block" and s.start < hold), None)
        if blocking is not None:
            hold, self.blocked = blocking.start, True
        if hold <= self._settled:
            return ""
        shown = redact(text, spans, self._redactor, self._settled, hold)
        self._applied |= {(s.start, s.end) for s in spans if self._settled <= s.start and s.end <= hold}
        self._settled = hold
        self._emitted.append(shown)
        return shown

    def _holdback(self, text: str) -> int:
        guards = [g for g in self.pipeline.guards if hasattr(g, "holdback")]
        return min([len(text), *(g.holdback(text, self._settled) for g in guards)])
