"""The PII guard: e-mail, phone, payment card, IBAN, US SSN, UK NINO, IP address, street address.

Why not Presidio: its analyzer needs a spaCy model that cannot be downloaded here (and must not be
fetched at run time), and its pattern recognizers come only with that analyzer. So the regular
expressions below are ours, and they are the product's behavior; the validation behind them is
delegated to well-kept libraries, the same ones Presidio uses where it can: `phonenumbers`
(Google's libphonenumber) for phone numbers, `python-stdnum` for the Luhn check, IBAN formats and
checksums per country, and SSN rules, and the standard `ipaddress` for IP addresses. The national
IDs covered are the US SSN and the UK National Insurance number.

Each pattern is written for streaming (see patterns.py): it reads at most a few characters past
its match, and a pattern that proposes too much (a phone candidate with a trailing number) is cut
down by its validator, never extended.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence

import phonenumbers
import regex
from stdnum import iban, luhn
from stdnum.us import ssn

from llmasos.safety.patterns import PatternGuard, Recognizer, SpanFinder, accept

EMAIL = regex.compile(
    r"(?<![\w.+%-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "svg", "webp"}
# A loose run of digits with single separators; libphonenumber finds the numbers inside it.
PHONE = regex.compile(
    r"(?<![\w+.\-/])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d(?:[ .-]?\d){5,14}"
    r"(?:[ ]?(?:ext\.?|x)[ ]?\d{1,5})?(?![\w/]|[.-]\d)"
)
CREDIT_CARD = regex.compile(r"(?<![\w-])(?<!\d[ -])[2-6](?:[ -]?\d){12,18}(?!\w|-\d)")
IBAN = regex.compile(r"(?<!\w)[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?(?!\w)")
US_SSN = regex.compile(r"(?<![\w-])\d{3}([- ])\d{2}\1\d{4}(?![\w-]|\.\d)")
# First letter not D F I Q U V, second not D F I O Q U V, and never the unallocated BG GB KN NK NT TN ZZ.
UK_NINO = regex.compile(
    r"(?<!\w)(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r"[ ]?\d{2}[ ]?\d{2}[ ]?\d{2}[ ]?[A-D](?!\w)"
)
IPV4 = regex.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\.?\w)")
IPV6 = regex.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:]|\.\w)")
# "1.2.3.4" after one of these words is a version, not an address ("v1.2.3.4" never matches IPV4).
VERSION_CONTEXT = regex.compile(
    r"(?i)\b(?:v|versions?|ver|rel|release|build|firmware|patch|update|upgrade|downgrade)\.?"
    r"(?:[ ](?:is|was|of|to|from))?[ :=#-]*$"
)
STREET_SUFFIXES = (
    "Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|Ter|Way|"
    "Parkway|Pkwy|Highway|Hwy|Circle|Cir|Square|Sq|Trail|Trl|Alley|Plaza|Row"
)
STREET_ADDRESS = regex.compile(
    r"(?<![\w-])\d{1,6}[A-Z]?[ ](?:(?:N|S|E|W|North|South|East|West)\.?[ ])?"
    r"(?:(?:[A-Z][A-Za-z'-]*|\d{1,3}(?:st|nd|rd|th))[ ]){1,4}?"  # lazy: the first suffix ends it
    rf"(?:{STREET_SUFFIXES})\b\.?(?:[ ](?:NE|NW|SE|SW|N|S|E|W)\b)?"
    r"(?:,?[ ](?:Apt|Suite|Ste|Unit)\.?[ ]?#?[A-Z0-9-]{1,6}\b|,?[ ]#[A-Z0-9-]{1,6}\b)?"
)


def _longest_valid_prefix(valid: Callable[[str], bool]) -> SpanFinder:
    """The longest prefix of the candidate, cut at a space or dash, that `valid` accepts: a greedy
    candidate may have taken in what follows ("4111 1111 1111 1111 12/25", "BE71 ... 6769 BIC")."""

    def spans(match: regex.Match) -> list[tuple[int, int]]:
        text = match.group()
        for end in [len(text), *(i for i in range(len(text) - 1, 0, -1) if text[i] in " -")]:
            if valid(text[:end]):
                return [(match.start(), match.start() + end)]
        return []

    return spans


def _card(candidate: str) -> bool:
    digits = regex.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def _email(match: regex.Match) -> bool:
    """Not an image name with a retina suffix ("icon@2x.png"), the one common look-alike."""
    return match.group().rsplit(".", 1)[1].lower() not in IMAGE_EXTENSIONS


def _ipv4(match: regex.Match) -> bool:
    try:
        ipaddress.IPv4Address(match.group())
    except ValueError:
        return False
    return not VERSION_CONTEXT.search(match.string, 0, match.start())


def _ipv6(match: regex.Match) -> bool:
    """Valid, and with a group of 3+ hex digits: "1::2" is a Python slice far more often."""
    try:
        ipaddress.IPv6Address(match.group())
    except ValueError:
        return False
    return any(len(group) >= 3 for group in match.group().split(":"))


def _phone_spans(regions: tuple[str, ...]):
    # A stream re-checks the same candidates at every delta, and libphonenumber takes about a
    # millisecond per candidate: remember the recent ones (digit runs, not the text around them).
    @functools.lru_cache(maxsize=4096)
    def numbers(candidate: str) -> list[tuple[int, int]]:
        found = {
            (number.start, number.end)
            for region in regions
            for number in phonenumbers.PhoneNumberMatcher(candidate, region, phonenumbers.Leniency.VALID)
        }
        return sorted(found)

    def spans(match: regex.Match) -> list[tuple[int, int]]:
        return [(match.start() + start, match.start() + end) for start, end in numbers(match.group())]

    return spans


def pii_guard(regions: Sequence[str] = ("US", "GB")) -> PatternGuard:
    """The PII guard. `regions` are where a phone number without a +country prefix may be from:
    each added region makes more digit runs valid numbers somewhere, so keep the list short."""
    return PatternGuard(
        "pii",
        [
            Recognizer("email", EMAIL, 0.9, accept(_email)),
            Recognizer("phone", PHONE, 0.75, _phone_spans(tuple(regions))),
            Recognizer("credit_card", CREDIT_CARD, 0.95, _longest_valid_prefix(_card)),
            Recognizer("iban", IBAN, 0.95, _longest_valid_prefix(iban.is_valid)),
            Recognizer("us_ssn", US_SSN, 0.85, accept(lambda m: ssn.is_valid(m.group().replace(" ", "-")))),
            Recognizer("uk_nino", UK_NINO, 0.85),
            Recognizer("ip_address", IPV4, 0.8, accept(_ipv4)),
            Recognizer("ip_address", IPV6, 0.8, accept(_ipv6)),
            Recognizer("street_address", STREET_ADDRESS, 0.6),
        ],
    )
