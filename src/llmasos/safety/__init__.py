"""Guards on input and output: PII, secrets, policies, redaction, streaming (the OS's security).

    from llmasos.safety import GuardPipeline, PolicySet, StreamGuard, default_guards

    guards = default_guards()  # build once, share: guards hold no per-request state
    policy = PolicySet.load("policies.yaml").policy_for(model="qwen3", key="support-bot")
    pipeline = GuardPipeline(guards, policy)
    verdict = pipeline.check_input(prompt)  # allow / redact / block, with findings and text
    stream = StreamGuard(pipeline)  # per streamed output: feed(delta) -> safe text, finish()

A new guard is one class with `name`, `categories` and `check(text) -> list[Finding]`
(plus `holdback(text) -> int` to stream without delay); its categories go in CATEGORIES.
"""

from llmasos.safety.credentials import secrets_guard
from llmasos.safety.findings import ACTIONS, CATEGORIES, Action, Finding, Guard, Verdict
from llmasos.safety.patterns import PatternGuard, Recognizer
from llmasos.safety.pii import pii_guard
from llmasos.safety.pipeline import GuardPipeline, Span
from llmasos.safety.policy import Policy, PolicySet
from llmasos.safety.redaction import REDACTION_STYLES, RedactionStyle, Redactor, Vault
from llmasos.safety.stream import StreamGuard


def default_guards() -> list[Guard]:
    """The PII and secrets guards, with their defaults."""
    return [pii_guard(), secrets_guard()]


__all__ = [
    "ACTIONS",
    "CATEGORIES",
    "REDACTION_STYLES",
    "Action",
    "Finding",
    "Guard",
    "GuardPipeline",
    "PatternGuard",
    "Policy",
    "PolicySet",
    "Recognizer",
    "RedactionStyle",
    "Redactor",
    "Span",
    "StreamGuard",
    "Vault",
    "Verdict",
    "default_guards",
    "pii_guard",
    "secrets_guard",
]
