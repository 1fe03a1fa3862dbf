"""Guards on input and output: PII, secrets, policies, redaction, streaming (the OS's security).

    from llmasos.safety import GuardPipeline, PolicySet, StreamGuard, default_guards

    guards = default_guards()  # build once, share: guards hold no per-request state
    policy = PolicySet.load("policies.yaml").policy_for(model="qwen3", key="support-bot")
    pipeline = GuardPipeline(guards, policy)
    verdict = pipeline.check_input(prompt)  # allow / redact / block, with findings and text
    verdict = pipeline.check_context(document)  # a retrieved document or tool result, untrusted
    stream = StreamGuard(pipeline)  # per streamed output: feed(delta) -> safe text, finish()

A new guard is one class with `name`, `categories` and `check(text) -> list[Finding]`
(plus `holdback(text) -> int` to stream without delay, and `check_context(text)` where text that
did not come from the user needs other treatment); its categories go in CATEGORIES.

Unsafe content and prompt injection have two layers: built-in guards that need no model
(ContentGuard, a lexicon over the Llama Guard 3 taxonomy; InjectionGuard, the known attack
families) in default_guards(), and judges that run a model from the store through the kernel
(ModelJudge for Llama Guard or any decoder, ClassifierJudge for a text classifier with a head).
"""

from llmasos.safety.content import ContentGuard
from llmasos.safety.credentials import secrets_guard
from llmasos.safety.findings import ACTIONS, CATEGORIES, Action, Finding, Guard, Verdict
from llmasos.safety.injection import InjectionGuard
from llmasos.safety.judge import Assessment, ClassifierJudge, ModelJudge
from llmasos.safety.patterns import PatternGuard, Recognizer
from llmasos.safety.pii import pii_guard
from llmasos.safety.pipeline import GuardPipeline, Span
from llmasos.safety.policy import Policy, PolicySet
from llmasos.safety.redaction import REDACTION_STYLES, RedactionStyle, Redactor, Vault
from llmasos.safety.stream import StreamGuard


def default_guards() -> list[Guard]:
    """The PII and secrets guards and the built-in content and injection layers, with their defaults."""
    return [pii_guard(), secrets_guard(), ContentGuard(), InjectionGuard()]


__all__ = [
    "ACTIONS",
    "CATEGORIES",
    "REDACTION_STYLES",
    "Action",
    "Assessment",
    "ClassifierJudge",
    "ContentGuard",
    "Finding",
    "Guard",
    "GuardPipeline",
    "InjectionGuard",
    "ModelJudge",
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
