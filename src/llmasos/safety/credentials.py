"""The secrets guard: API keys and tokens, secret-named assignments, private keys.

Where the knowledge comes from:
- data/secrets.yaml, the provider rules: named patterns with keywords and an entropy floor, after
  gitleaks' default rule set (OpenAI, Anthropic, AWS key ids and secret keys, GitHub, GitLab,
  Slack, Stripe, Google, Hugging Face, Azure, npm, PyPI, JWTs, private keys, database URLs,
  generic `password=`/`token:` assignments and more). Rules are data, so a provider is a few lines
  of YAML; `load_rules` checks every field and names the file and the rule in its errors.
- detect-secrets, for the providers it covers well and the YAML does not (Artifactory, Cloudant,
  Discord, IBM Cloud, IBM COS, Mailchimp, SendGrid, SoftLayer, Square OAuth, Telegram, Twilio),
  its keyword patterns for quoted password-like values (`password = "..."`, `"secret": "..."`,
  `"..." == pwd`) and its heuristic filters (sequential strings, UUIDs, templates).
  Its plugins that a YAML rule supersedes are left out, so one key is one finding: AWS, Azure
  storage, GitHub, GitLab, JWT, npm, OpenAI, PyPI, Slack, Stripe, basic auth, private keys. Its
  high-entropy string plugins are left out too: alone, entropy cannot tell a key from a hash, a
  commit id, a base64 image or a random id in JSON, and the rules find keys by their shape or name.

detect-secrets' scanning is not used, for three reasons: its settings are one global object that
`transient_settings` rewrites (not safe under a server's threads), it yields secret values without
their offsets, and a stream needs the patterns themselves to know what to hold back. So the
plugins' compiled patterns are recompiled with `regex` (same syntax) and run line by line, as
detect-secrets runs them. Overlapping findings of one key (a GitHub token in `token = "..."`)
keep the outermost one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import regex
from detect_secrets.filters import heuristic
from detect_secrets.plugins.artifactory import ArtifactoryDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.cloudant import CloudantDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.ibm_cloud_iam import IbmCloudIamDetector
from detect_secrets.plugins.ibm_cos_hmac import IbmCosHmacDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import DENYLIST, QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.softlayer import SoftlayerDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

from llmasos.errors import LLMasOSError
from llmasos.safety.findings import CATEGORIES, Finding
from llmasos.safety.patterns import PatternGuard, Recognizer, SpanFinder
from llmasos.templates import read_yaml

RULES_FILE = Path(__file__).with_name("data") / "secrets.yaml"
VENDOR_DETECTORS: tuple[type[RegexBasedDetector], ...] = (
    ArtifactoryDetector,
    CloudantDetector,
    DiscordBotTokenDetector,
    IbmCloudIamDetector,
    IbmCosHmacDetector,
    MailchimpDetector,
    SendGridDetector,
    SoftlayerDetector,
    SquareOAuthDetector,
    TelegramBotTokenDetector,
    TwilioKeyDetector,
)
CHECKS: dict[str, Callable[[str], bool]] = {"jwt": JwtTokenDetector.is_formally_valid}
RULE_FIELDS = {
    "id", "provider", "description", "category", "regex", "keywords", "entropy", "allow",
    "allow_match", "check", "multiline", "score",
}  # fmt: skip
# The keywords of detect-secrets' keyword patterns, for the prefilter ("api_?key" -> "key").
DENYLIST_KEYWORDS = ("key", "pass", "pwd", "secret", "contrase")
DENYLIST_PREFIX = "(" + "|".join(DENYLIST) + ")"  # how the patterns that start with the keyword start
_EDGES = " \t\"'=:`"  # some vendor patterns take in the delimiter around the key


@dataclass(frozen=True)
class SecretRule:
    """One rule of data/secrets.yaml, compiled (see the file's header for the fields)."""

    id: str
    provider: str
    category: str
    pattern: regex.Pattern
    keywords: tuple[str, ...]
    entropy: float
    allow: tuple[regex.Pattern, ...]
    allow_match: tuple[regex.Pattern, ...]
    check: Callable[[str], bool] | None
    multiline: bool
    score: float

    def spans(self, match: regex.Match) -> list[tuple[int, int]]:
        """The secret of a match (group `secret`, else all of it) unless a filter lets it go."""
        if any(a.search(match.group()) for a in self.allow_match):
            return []
        start, end = match.span("secret") if "secret" in self.pattern.groupindex else match.span()
        if start < 0:  # a pattern with a `secret` group in only some alternatives
            start, end = match.span()
        value = match.string[start:end]
        keep = (
            shannon_entropy(value) >= self.entropy
            and not any(a.search(value) for a in self.allow)
            and _plausible(value)
            and (self.check is None or self.check(value))
        )
        return [(start, end)] if keep else []

    def recognizer(self) -> Recognizer:
        return Recognizer(
            self.category, self.pattern, self.score, self.spans, not self.multiline, self.keywords
        )


def shannon_entropy(value: str) -> float:
    """Bits a character over the value's own characters. detect-secrets' calculate_shannon_entropy
    counts only its plugin's charset, so it would read `sk-proj-...` or `glpat-...` as less random
    than they are; gitleaks' floors are over all the characters, as here."""
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values()) if value else 0.0


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[SecretRule, ...]
    placeholders: tuple[regex.Pattern, ...]  # values no rule reports, as detect-secrets' keywords too
    not_secret_names: tuple[regex.Pattern, ...]  # on a match that starts at a name: not a secret


def load_rules(path: Path | str = RULES_FILE) -> RuleSet:
    """The rules of a file shaped like data/secrets.yaml, compiled, in the file's order."""
    path = Path(path)
    data = read_yaml(path, "the secrets rules (see llmasos/safety/data/secrets.yaml)")
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise LLMasOSError(
            f"the secrets rules {path} must hold a list 'rules' (and optionally 'placeholders'); "
            "see llmasos/safety/data/secrets.yaml"
        )
    lists = {key: data.get(key) or [] for key in ("placeholders", "not_secret_names")}
    for key, patterns in lists.items():
        if not isinstance(patterns, list):
            raise LLMasOSError(f"{path}: '{key}' is a list of patterns")
    rules, ids = [], set()
    for entry in data["rules"]:
        rule = _rule(entry, f"{path}: rule {entry.get('id') if isinstance(entry, dict) else entry!r}")
        if rule.id in ids:
            raise LLMasOSError(f"{path}: two rules are named {rule.id!r}; rule ids name findings' sources")
        ids.add(rule.id)
        rules.append(rule)
    placeholders, names = (tuple(_compile(p, f"{path}: {key}") for p in lists[key]) for key in lists)
    return RuleSet(tuple(rules), placeholders, names)


def _rule(entry: object, where: str) -> SecretRule:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or "regex" not in entry:
        raise LLMasOSError(f"{where}: a rule is a mapping with at least 'id' and 'regex'")
    unknown = sorted(set(entry) - RULE_FIELDS)
    if unknown:
        raise LLMasOSError(f"{where}: unknown fields {unknown}; a rule has {sorted(RULE_FIELDS)}")
    category = entry.get("category", "api_key")
    if category not in CATEGORIES:
        raise LLMasOSError(f"{where}: unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    if entry.get("check") is not None and entry["check"] not in CHECKS:
        raise LLMasOSError(f"{where}: unknown check {entry['check']!r}; known: {', '.join(CHECKS)}")
    keywords = entry.get("keywords") or []
    if not all(isinstance(k, str) and k and k == k.lower() for k in keywords):
        raise LLMasOSError(f"{where}: keywords are non-empty lower-case strings, got {keywords!r}")
    entropy, score = entry.get("entropy", 0), entry.get("score", 0.95)
    if not isinstance(entropy, int | float) or not isinstance(score, int | float) or not 0 < score <= 1:
        raise LLMasOSError(f"{where}: entropy is a number of bits and score a number in (0, 1]")
    return SecretRule(
        id=entry["id"],
        provider=str(entry.get("provider", entry["id"])),
        category=category,
        pattern=_compile(entry["regex"], where),
        keywords=tuple(keywords),
        entropy=float(entropy),
        allow=tuple(_compile(p, where) for p in entry.get("allow") or []),
        allow_match=tuple(_compile(p, where) for p in entry.get("allow_match") or []),
        check=CHECKS.get(entry.get("check")),
        multiline=bool(entry.get("multiline", False)),
        score=float(score),
    )


def _compile(pattern: object, where: str) -> regex.Pattern:
    if not isinstance(pattern, str):
        raise LLMasOSError(f"{where}: a pattern is a string, got {pattern!r}")
    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise LLMasOSError(f"{where}: the pattern {pattern!r} does not compile: {exc}") from exc


def _recompile(pattern: re.Pattern) -> regex.Pattern:
    return regex.compile(pattern.pattern, pattern.flags)


def _plausible(value: str) -> bool:
    """detect-secrets' default heuristic filters that look at the value alone."""
    return not (
        heuristic.is_sequential_string(value)
        or heuristic.is_potential_uuid(value)
        or heuristic.is_templated_secret(value)
        or heuristic.is_prefixed_with_dollar_sign(value)
        or heuristic.is_not_alphanumeric_string(value)
    )


def _value_span(match: regex.Match) -> tuple[int, int]:
    """The key in a vendor pattern's match: the captured value where the pattern captures one
    (`softlayer_key = "<value>"`), else the whole match, less the delimiters some patterns take
    in around it."""
    groups = [i for i in range(1, len(match.groups()) + 1) if len(match.group(i) or "") >= 16]
    start, end = match.span(max(groups, key=lambda i: len(match.group(i)), default=0))
    while start < end and match.string[start] in _EDGES:
        start += 1
    while end > start and match.string[end - 1] in _EDGES:
        end -= 1
    return start, end


def _vendor_spans(match: regex.Match) -> list[tuple[int, int]]:
    start, end = _value_span(match)
    return [(start, end)] if _plausible(match.string[start:end]) else []


def _keyword_spans(group: int, ruleset: RuleSet) -> SpanFinder:
    """detect-secrets' keyword patterns, less placeholders and names that hold no secret."""

    def spans(match: regex.Match) -> list[tuple[int, int]]:
        value = match.group(group)
        if any(n.search(match.group()) for n in ruleset.not_secret_names):
            return []
        return (
            [match.span(group)]
            if _plausible(value) and not any(p.search(value) for p in ruleset.placeholders)
            else []
        )

    return spans


class SecretsGuard(PatternGuard):
    """A PatternGuard whose findings inside another finding are dropped: a key that a provider
    rule and a keyword pattern both find is one finding (the provider's, which comes first)."""

    def check(self, text: str) -> list[Finding]:
        kept: list[Finding] = []
        for finding in super().check(text):  # by start, the longest first
            if not any(k.start <= finding.start and finding.end <= k.end for k in kept):
                kept.append(finding)
        return kept


def secrets_guard(rules_file: Path | str = RULES_FILE) -> SecretsGuard:
    """The secrets guard: the YAML rules first, then detect-secrets' vendor and keyword patterns."""
    ruleset = load_rules(rules_file)
    vendor = [
        Recognizer("api_key", _recompile(pattern), 0.95, _vendor_spans)
        for detector in VENDOR_DETECTORS
        for pattern in detector.denylist
    ]
    keywords = [
        Recognizer(
            "secret",
            _recompile(pattern),
            0.8,
            _keyword_spans(group, ruleset),
            # the `"value" == password` pattern has its value before the keyword: no prefilter
            keywords=DENYLIST_KEYWORDS if pattern.pattern.startswith(DENYLIST_PREFIX) else (),
        )
        for pattern, group in QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP.items()
    ]
    return SecretsGuard("secrets", [*(rule.recognizer() for rule in ruleset.rules), *vendor, *keywords])
