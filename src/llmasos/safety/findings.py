"""What a guard reports and what the pipeline decides: findings, actions, verdicts.

A guard only finds things (a category, a span, a score); what to do about a category is the
policy's business, so one guard instance serves every key and every model. A verdict is what
the pipeline made of one text under one policy, and it is what goes to the audit log: the
categories, actions and offsets, never the content they point at.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, Protocol

Action = Literal["allow", "redact", "block"]
ACTIONS: tuple[Action, ...] = ("allow", "redact", "block")  # from mildest to strictest

# Every category a guard may report. A policy naming anything else is a typo, and is refused.
# A new guard adds its categories here, one line each.
CATEGORIES: dict[str, str] = {
    "email": "an e-mail address",
    "phone": "a telephone number that libphonenumber validates",
    "credit_card": "a payment card number that passes the Luhn check",
    "iban": "an IBAN with a valid ISO 13616 mod-97 checksum and country format",
    "us_ssn": "a US Social Security number outside the never-issued ranges",
    "uk_nino": "a UK National Insurance number with an allocated prefix",
    "ip_address": "an IPv4 or IPv6 address (not a version number)",
    "street_address": "a US-style street address: number, street name, street suffix",
    "api_key": "an API key or access token (the provider rules of safety/data/secrets.yaml)",
    "secret": "a value assigned to a name like password, secret or api_key, or credentials in a URL",
    "private_key": "a PEM, OpenSSH or PGP private key block",
    # Unsafe content: the Llama Guard 3 taxonomy (MLCommons hazards S1-S13, and S14)
    "violent_crimes": "S1 Violent Crimes: enabling, encouraging or endorsing violence against people",
    "non_violent_crimes": "S2 Non-Violent Crimes: fraud, theft, hacking, drugs, weapons and other crimes",
    "sex_crimes": "S3 Sex-Related Crimes: sexual assault, trafficking, non-consensual imagery",
    "child_exploitation": "S4 Child Sexual Exploitation: any sexual content involving minors",
    "defamation": "S5 Defamation: verifiably false claims that injure a living person's reputation",
    "specialized_advice": "S6 Specialized Advice: medical, legal or financial advice for one's own case",
    "privacy": "S7 Privacy: sensitive, non-public personal information, tracking, doxxing",
    "intellectual_property": "S8 Intellectual Property: copyrighted text, piracy, cracked licenses",
    "indiscriminate_weapons": "S9 Indiscriminate Weapons: chemical, biological, nuclear, explosive",
    "hate": "S10 Hate: demeaning or dehumanizing people for a protected characteristic",
    "self_harm": "S11 Suicide & Self-Harm: enabling or encouraging suicide, self-injury, disordered eating",
    "sexual_content": "S12 Sexual Content: sexually explicit content",
    "elections": "S13 Elections: false information about voting, election fraud, voter suppression",
    "code_interpreter_abuse": "S14 Code Interpreter Abuse: destructive commands, sandbox escape",
    # Attacks on the model itself
    "prompt_injection": "instructions that try to override the system's (direct, or hidden in documents)",
    "jailbreak": "a persona or framing meant to lift the model's safety rules (DAN, developer mode)",
}


@dataclass(frozen=True)
class Finding:
    """Something a guard found in text[start:end], with how sure it is (0..1)."""

    category: str
    start: int
    end: int
    score: float
    guard: str


class Guard(Protocol):
    """One detector. A guard that can be streamed also has `holdback(text, start) -> int`: the
    index from which the tail of `text` could still become part of a finding once more text
    arrives (len(text) when nothing is pending), told that all before `start` was settled by an
    earlier call on a prefix of `text`. Without it, a stream emits text as soon as the guard has
    nothing on it, and a finding that later covers text already sent blocks the stream."""

    name: str
    categories: tuple[str, ...]

    def check(self, text: str) -> list[Finding]: ...


def strictest(actions: Iterable[Action]) -> Action:
    return max(actions, key=ACTIONS.index, default="allow")


@dataclass(frozen=True)
class Verdict:
    """The pipeline's decision on one text: `text` is what may be passed on (redacted when the
    action is redact, empty when it is block); `actions` is what the policy did per category."""

    action: Action
    findings: tuple[Finding, ...]
    text: str
    actions: Mapping[str, Action] = field(default_factory=dict)
    stage: Literal["input", "output"] = "output"

    def audit_record(self, key_id: str | None, request_id: str | None) -> dict:
        """One audit-log record in the shape of `serve.audit.AuditLog`'s (time, key, request_id),
        with what was found and done: categories, actions, counts and offsets, never content."""
        counts = Counter(f.category for f in self.findings)
        return {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": "guard",
            "key": key_id,
            "request_id": request_id,
            "stage": self.stage,
            "action": self.action,
            "categories": {c: {"action": self.actions[c], "count": n} for c, n in sorted(counts.items())},
            "findings": [
                {
                    "category": f.category,
                    "action": self.actions[f.category],
                    "start": f.start,
                    "end": f.end,
                    "score": round(f.score, 3),
                    "guard": f.guard,
                }
                for f in self.findings
            ],
        }
