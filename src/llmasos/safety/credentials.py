"""The secrets guard: API keys and tokens, secret-named assignments, private keys.

The knowledge is detect-secrets': its vendor plugins' patterns (AWS, GitHub, GitLab, Slack,
Stripe, OpenAI, JWT, ...), its keyword patterns (`password = "..."`, with the quotes it requires
on text of unknown type), its Shannon entropy on quoted strings, and its heuristic filters
(sequential strings, UUIDs, templates). Its scanning is not used, for three reasons: its settings
are one global object that `transient_settings` rewrites (not safe under a server's threads), it
yields secret values without their offsets, and a stream needs the patterns themselves to know
what to hold back. So the plugins' compiled patterns are recompiled with `regex` (same syntax) and
run line by line, as detect-secrets runs them. Private keys are ours: detect-secrets sees only
a key's BEGIN line, and the whole block must go.
"""

from __future__ import annotations

import re

import regex
from detect_secrets.filters import heuristic
from detect_secrets.plugins.artifactory import ArtifactoryDetector
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.cloudant import CloudantDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import (
    Base64HighEntropyString,
    HexHighEntropyString,
    HighEntropyStringsPlugin,
)
from detect_secrets.plugins.ibm_cloud_iam import IbmCloudIamDetector
from detect_secrets.plugins.ibm_cos_hmac import IbmCosHmacDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.softlayer import SoftlayerDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

from llmasos.safety.patterns import PatternGuard, Recognizer, SpanFinder

# detect-secrets' private-key plugin and its public-IP one are left out: the block below and the
# PII guard's ip_address do their jobs over whole spans. JWT's and npm's patterns are replaced.
VENDOR_DETECTORS: tuple[type[RegexBasedDetector], ...] = (
    ArtifactoryDetector,
    AWSKeyDetector,
    AzureStorageKeyDetector,
    CloudantDetector,
    DiscordBotTokenDetector,
    GitHubTokenDetector,
    GitLabTokenDetector,
    IbmCloudIamDetector,
    IbmCosHmacDetector,
    MailchimpDetector,
    OpenAIDetector,
    PypiTokenDetector,
    SendGridDetector,
    SlackDetector,
    SoftlayerDetector,
    SquareOAuthDetector,
    StripeDetector,
    TelegramBotTokenDetector,
    TwilioKeyDetector,
)
# detect-secrets' JWT pattern ends lazily, so its match stops before the signature; this one
# takes the signature too (a finding's span must lie inside its match).
JWT = regex.compile(r"eyJ[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_.+/=-]*)?")
# detect-secrets' npm pattern ("//.+/:_authToken=...") backtracks in quadratic time on a long line
# of "//"s, and prompts are untrusted: this one finds the same tokens in linear time.
NPM_TOKEN = regex.compile(r"npm_[A-Za-z0-9]{36}|_authToken=[ ]?([^\s'\"]{16,})")
PRIVATE_KEY = regex.compile(
    r"-{4,5} ?BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)? ?-{4,5}"
    r"[\s\S]*?(?:-{4,5} ?END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)? ?-{4,5}|\Z)"  # a cut-off key to the end
)
_EDGES = " \t\"'=:`"  # some vendor patterns take in the delimiter around the key


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
    (`aws_secret = "<value>"`), else the whole match (GitHub's and GitLab's capture only the
    token's prefix, "ghp"), less the delimiters some patterns take in around it."""
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


def _group_spans(group: int) -> SpanFinder:
    def spans(match: regex.Match) -> list[tuple[int, int]]:
        return [match.span(group)] if _plausible(match.group(group)) else []

    return spans


def _entropy_spans(plugin: HighEntropyStringsPlugin) -> SpanFinder:
    def spans(match: regex.Match) -> list[tuple[int, int]]:
        value = match.group(2)
        high = plugin.calculate_shannon_entropy(value) > plugin.entropy_limit
        return [match.span(2)] if high and _plausible(value) else []

    return spans


def _jwt_spans(match: regex.Match) -> list[tuple[int, int]]:
    return [match.span()] if JwtTokenDetector.is_formally_valid(match.group()) else []


def secrets_guard() -> PatternGuard:
    """The secrets guard, over detect-secrets' default plugins and entropy limits."""
    vendor = [
        Recognizer("api_key", _recompile(pattern), 0.95, _vendor_spans)
        for detector in VENDOR_DETECTORS
        for pattern in detector.denylist
    ]
    entropy = [
        Recognizer("api_key", _recompile(plugin.regex), 0.7, _entropy_spans(plugin))
        for plugin in (Base64HighEntropyString(limit=4.5), HexHighEntropyString(limit=3.0))
    ]
    keywords = [
        Recognizer("secret", _recompile(pattern), 0.8, _group_spans(group))
        for pattern, group in QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP.items()
    ]
    basic_auth = [
        Recognizer("secret", _recompile(p), 0.9, _group_spans(1)) for p in BasicAuthDetector.denylist
    ]
    jwt = Recognizer("api_key", JWT, 0.9, _jwt_spans)
    npm = Recognizer("api_key", NPM_TOKEN, 0.9, _vendor_spans)
    private_key = Recognizer("private_key", PRIVATE_KEY, 1.0, line_local=False)
    return PatternGuard("secrets", [*vendor, jwt, npm, *entropy, *keywords, *basic_auth, private_key])
