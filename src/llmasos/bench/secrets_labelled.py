"""The secrets guard's labelled set, drawn from data/secrets_labelled.yaml, and its scoring.

The set is generated, not stored: a case's secret is drawn in its provider's shape by a seeded
generator, so the cases are the same on every run, are as many as the templates say, and no real
or realistic key is committed for secret scanners to flag (the YAML says how shapes and templates
read). Scoring is per case: a positive is found when the guard's findings cover every expected
secret in it (what a redaction would leave of it is nothing); a negative is a false positive when
the guard finds anything in it, and so is a finding in a positive that touches no expected secret.
"""

from __future__ import annotations

import base64
import json
import random
import string
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import regex

from llmasos.errors import LLMasOSError
from llmasos.templates import read_yaml

LABELLED = Path(__file__).with_name("data") / "secrets_labelled.yaml"
ALPHABETS = {
    "b62": string.ascii_letters + string.digits,
    "url": string.ascii_letters + string.digits + "_-",
    "b64": string.ascii_letters + string.digits + "+/",
    "hex": "0123456789abcdef",
    "lalnum": string.ascii_lowercase + string.digits,
    "ualnum": string.ascii_uppercase + string.digits,
    "letters": string.ascii_letters,
    "digits": string.digits,
    "b32": string.ascii_uppercase + "234567",
    "bech32": "QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L",
    "azure": string.ascii_letters + string.digits + "_~.-",
    "bcrypt": string.ascii_letters + string.digits + "./",
}
ALIASES = {
    "sha1": "hex:40",
    "sha256": "hex:64",
    "md5": "hex:32",
    "short_commit": "hex:7",
    "bcrypt": "bcrypt:53",
}
# {name}, {name:arg}, {name|transform}; anything else in braces (JSON, ${VAR}) is left as written
FIELD = regex.compile(r"\{(\w+)(?:\|(\w+))?(?::([^{}\n]+))?\}")
TRANSFORMS: dict[str, Callable[[str], str]] = {
    "json": lambda value: json.dumps(value)[1:-1],
    "indent": lambda value: value.replace("\n", "\n    "),
}


@dataclass(frozen=True)
class Case:
    text: str
    format: str
    provider: str | None  # None: a negative
    secrets: tuple[str, ...]  # what must be found, as it appears in the text
    kind: str = ""  # a negative's kind (hash, uuid, look-alike, ...)


@dataclass
class Tally:
    """One row of the score: a format, a provider or a kind of negative."""

    positives: int = 0
    negatives: int = 0
    found: int = 0
    flagged: int = 0  # negatives with a finding, and stray findings in positives

    @property
    def recall(self) -> float:
        return self.found / self.positives if self.positives else 1.0

    @property
    def precision(self) -> float:
        return self.found / (self.found + self.flagged) if self.found + self.flagged else 1.0


@dataclass
class LabelledScore:
    formats: dict[str, Tally]
    providers: dict[str, Tally]
    negative_kinds: dict[str, Tally]
    failures: list[str]

    @property
    def total(self) -> Tally:
        total = Tally()
        for tally in self.formats.values():
            total.positives += tally.positives
            total.negatives += tally.negatives
            total.found += tally.found
            total.flagged += tally.flagged
        return total


class _Drawer:
    """Fills a template's fields from a seeded generator."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def fill(self, template: str, values: dict[str, str] | None = None) -> str:
        values = values or {}

        def field(match: regex.Match) -> str:
            name, transform, arg = match.groups()
            if name in values:
                value = values[name]
            elif name in ALIASES and arg is None:
                value = self.shape(*ALIASES[name].split(":"))
            elif name in ALPHABETS and arg is not None:
                value = self.shape(name, arg)
            elif hasattr(self, f"_{name}"):
                value = getattr(self, f"_{name}")(arg)
            else:
                return match.group()
            return TRANSFORMS[transform](value) if transform else value

        return FIELD.sub(field, template)

    def shape(self, alphabet: str, length: str) -> str:
        low, _, high = length.partition("-")
        n = self.rng.randint(int(low), int(high or low))
        return "".join(self.rng.choices(ALPHABETS[alphabet], k=n))

    def _uuid(self, _: str | None) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _bytes(self, head: bytes, low: int, high: int) -> bytes:
        return head + self.rng.randbytes(self.rng.randint(low, high))

    def _png(self, _: str | None) -> str:
        return base64.b64encode(self._bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 120, 600)).decode()

    def _jpeg(self, _: str | None) -> str:
        return base64.b64encode(self._bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", 120, 600)).decode()

    def _sri(self, _: str | None) -> str:
        return base64.b64encode(self.rng.randbytes(64)).decode()

    def _jwt(self, _: str | None) -> str:
        def part(data: dict) -> str:
            return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

        claims = {
            "sub": str(self.rng.randrange(10**9)),
            "iat": self.rng.randrange(1_600_000_000, 1_800_000_000),
        }
        return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.{self.shape('url', '43')}"

    def _secret_word(self, symbols: str) -> str:
        """10 to 16 characters with a digit and a symbol, starting and ending with a letter or digit."""
        body = [*self.shape("b62", "8-14"), self.rng.choice(string.digits), self.rng.choice(symbols)]
        self.rng.shuffle(body)
        return self.rng.choice(string.ascii_letters) + "".join(body) + self.rng.choice(ALPHABETS["b62"])

    def _password(self, _: str | None) -> str:
        return self._secret_word("!@#%^*_-+")

    def _url_password(self, _: str | None) -> str:
        return self._secret_word("!*_-.~")

    def _pem(self, kind: str | None) -> str:
        body = base64.b64encode(self.rng.randbytes(self.rng.randint(120, 600))).decode()
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return "\n".join([f"-----BEGIN {kind}-----", *lines, f"-----END {kind}-----"])


def _camel(name: str) -> str:
    first, *rest = name.lower().split("_")
    return first + "".join(word.title() for word in rest)


def labelled_cases(path: Path = LABELLED, seed: int = 0) -> list[Case]:
    """The positives of every entry in every format, then the negatives, drawn with `seed`."""
    data = read_yaml(path, "the secrets labelled set (see llmasos/bench/data/secrets_labelled.yaml)")
    if not isinstance(data, dict) or not {"formats", "templates", "entries", "negatives"} <= set(data):
        raise LLMasOSError(f"{path} must hold formats, templates, entries and negatives")
    drawer = _Drawer(random.Random(seed))
    cases = []
    for number, entry in enumerate(data["entries"]):
        name = entry.get("name", "SECRET")
        values = {"name": name, "name_lower": name.lower(), "name_camel": _camel(name)}
        values["label"] = entry.get("label", entry["provider"])
        for fmt in data["formats"]:
            templates = (entry.get("templates") or data["templates"]).get(fmt) or data["templates"][fmt]
            for i in range(entry.get("cases", 1)):
                template = templates[(number + i) % len(templates)]
                key = drawer.fill(entry["shapes"][(number + i) % len(entry["shapes"])])
                values |= {"key": key, "extra": drawer.fill(entry.get("extra", ""))}
                text = drawer.fill(template, values)
                fields = [m.group() for m in FIELD.finditer(template) if m.group(1) in ("key", "extra")]
                secrets = [drawer.fill(field, values) for field in fields]
                cases.append(Case(text, fmt, entry["provider"], tuple(secrets)))
    copies = data.get("negative_copies", 1)
    for fmt in data["formats"]:
        texts: dict[str, str] = {}
        for kind, template in data["negatives"][fmt]:
            for _ in range(copies if drawer.fill(template) != template else 1):
                texts.setdefault(drawer.fill(template), kind)
        cases += [Case(text, fmt, None, (), kind) for text, kind in texts.items()]
    return cases


def _cover(text: str, spans: Sequence[tuple[int, int]], secret: str) -> bool:
    covered = [False] * len(text)
    for start, end in spans:
        covered[start:end] = [True] * (end - start)
    at = text.find(secret)
    if at < 0:
        raise LLMasOSError(f"a labelled case lost its secret {secret!r}: {text!r}")
    while at >= 0:
        if not all(covered[at : at + len(secret)]):
            return False
        at = text.find(secret, at + 1)
    return True


def score(check: Callable[[str], Sequence[tuple[int, int]]], cases: Sequence[Case]) -> LabelledScore:
    """Score `check` (text -> spans found) on the cases, per format, provider and kind of negative."""
    formats: dict[str, Tally] = defaultdict(Tally)
    providers: dict[str, Tally] = defaultdict(Tally)
    kinds: dict[str, Tally] = defaultdict(Tally)
    failures = []
    for case in cases:
        spans = list(check(case.text))
        rows = [formats[case.format], providers[case.provider] if case.provider else kinds[case.kind]]
        if case.provider is None:
            for row in rows:
                row.negatives += 1
                row.flagged += bool(spans)
            if spans:
                found = [case.text[a:b] for a, b in spans]
                failures.append(f"false ({case.format}, {case.kind}): {found} in {case.text!r}")
            continue
        hit = all(_cover(case.text, spans, s) for s in case.secrets)
        stray = [(a, b) for a, b in spans if not any(_touches(case.text, a, b, s) for s in case.secrets)]
        for row in rows:
            row.positives += 1
            row.found += hit
            row.flagged += len(stray)
        if not hit:
            found = [case.text[a:b] for a, b in spans]
            failures.append(
                f"missed ({case.format}, {case.provider}): {case.secrets} in {case.text!r}; found {found}"
            )
        if stray:
            failures.append(f"stray ({case.format}, {case.provider}): {[case.text[a:b] for a, b in stray]}")
    return LabelledScore(dict(formats), dict(providers), dict(kinds), failures)


def _touches(text: str, start: int, end: int, secret: str) -> bool:
    at = text.find(secret)
    while at >= 0:
        if start < at + len(secret) and at < end:
            return True
        at = text.find(secret, at + 1)
    return False
