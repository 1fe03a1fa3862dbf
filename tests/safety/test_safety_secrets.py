"""The secrets guard on its labelled set (bench/data/secrets_labelled.yaml: hundreds of keys of
dozens of providers in prose, code, shell, JSON, YAML and logs, and as many look-alikes), the
keys users reported passing through, the rules file's checks, and streaming: however a key
arrives, no part of it is ever sent."""

import random
from collections import Counter

import pytest

from llmasos.bench.secrets_labelled import labelled_cases, score
from llmasos.errors import LLMasOSError
from llmasos.safety import GuardPipeline, Policy, StreamGuard, secrets_guard
from llmasos.safety.credentials import load_rules

from labelled import assert_floors

MIN_PRECISION = 0.97
MIN_RECALL = 0.97


@pytest.fixture(scope="module")
def guard():
    return secrets_guard()


@pytest.fixture(scope="module")
def cases():
    return labelled_cases()


def _spans(guard):
    return lambda text: [(f.start, f.end) for f in guard.check(text)]


def test_the_labelled_set_is_as_large_and_varied_as_promised(cases):
    positives = [c for c in cases if c.provider]
    negatives = [c for c in cases if not c.provider]
    assert len(positives) >= 300 and len(negatives) >= 300
    assert len({c.provider for c in positives}) >= 25
    formats = {"prose", "code", "shell", "json", "yaml", "log"}
    assert {c.format for c in positives} == {c.format for c in negatives} == formats
    assert min(Counter(c.format for c in negatives).values()) >= 50
    assert {"hash", "uuid", "commit", "base64 image", "look-alike", "placeholder"} <= {
        c.kind for c in negatives
    }
    assert all(s in c.text for c in positives for s in c.secrets) and all(c.secrets for c in positives)
    assert labelled_cases() == cases  # seeded: the same set every run
    assert labelled_cases(seed=1) != cases


def test_precision_and_recall_per_format(guard, cases):
    result = score(_spans(guard), cases)
    rows = [(f, t.positives, t.negatives, t.precision, t.recall) for f, t in result.formats.items()]
    assert_floors(rows, result.failures, MIN_PRECISION, MIN_RECALL, "format")


def test_every_provider_is_found(guard, cases):
    result = score(_spans(guard), cases)
    rows = [(p, t.positives, t.negatives, t.precision, t.recall) for p, t in sorted(result.providers.items())]
    assert_floors(rows, result.failures, MIN_PRECISION, 0.9, "provider")


@pytest.mark.parametrize(
    "text, secret",
    [
        (
            "export OPENAI_API_KEY=sk-proj-Xq3vR8mTz1LpK0wYbN6cJ2hGfD9sA4uE7iOaQ5tV_yZ-MnB3cX8kLp2Rw",
            "sk-proj-Xq3vR8mTz1LpK0wYbN6cJ2hGfD9sA4uE7iOaQ5tV_yZ-MnB3cX8kLp2Rw",
        ),
        (
            "key sk-Hq7Tn2Pz9Lm4Kx1Rv8Wb3Yc6Jd0Fg5Sa2Ue7Io4Qt9Zr1Nm",
            "sk-Hq7Tn2Pz9Lm4Kx1Rv8Wb3Yc6Jd0Fg5Sa2Ue7Io4Qt9Zr1Nm",
        ),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
    ],
)
def test_the_keys_users_reported_are_redacted(text, secret):
    verdict = GuardPipeline([secrets_guard()], Policy()).check_input(text)
    assert verdict.action == "redact" and secret not in verdict.text
    assert [text[f.start : f.end] for f in verdict.findings] == [secret]  # one finding, the key's span


@pytest.mark.parametrize(
    "text",
    [
        "password = None",
        "token = get_token()",
        "secret: ${SECRET}",
        "sk-learn",
        "task-proj-manager",
        "sk-...",
    ],
)
def test_code_and_placeholders_are_not_secrets(guard, text):
    assert guard.check(text) == []


def test_a_keyword_comes_at_or_before_the_secret_of_every_match(cases):
    """The stream's prefilter is safe only so (see safety/patterns.py): check each rule's matches."""
    rules = [rule for rule in load_rules().rules if rule.keywords]
    checked = Counter()
    for case in (c for c in cases if c.provider):
        lowered = case.text.lower()
        for rule in rules:
            for match in rule.pattern.finditer(case.text):
                for start, _ in rule.spans(match):
                    hits = [lowered.find(k, match.start(), start + len(k)) for k in rule.keywords]
                    assert any(0 <= h <= start for h in hits), (rule.id, case.text)
                    checked[rule.id] += 1
    assert len(checked) >= 40  # most rules were seen finding something


def test_streaming_never_sends_a_piece_of_a_key(cases):
    """Every positive in random deltas of 1 to 6 characters, checked at every delta: what is
    emitted is always a prefix of the whole-text redaction (which hides every key), the stream
    never stops for a finding over text already sent, and no 8 characters of a key show."""
    pipeline = GuardPipeline([secrets_guard()], Policy())
    rng = random.Random(0)
    for case in (c for c in cases if c.provider):
        redacted = pipeline.check_output(case.text).text
        stream, emitted, cut = StreamGuard(pipeline, interval=1), "", 0
        while cut < len(case.text):
            step = rng.randint(1, 6)
            emitted += stream.feed(case.text[cut : cut + step])
            cut += step
            assert redacted.startswith(emitted) and not stream.blocked, case.text
            assert not any(s[:8] in emitted for s in case.secrets), case.text
        assert emitted + stream.finish() == redacted


@pytest.mark.parametrize(
    "rules, error",
    [
        ("rules: [{id: a}]", "at least 'id' and 'regex'"),
        ("rules: [{id: a, regex: 'x', colour: red}]", "unknown fields"),
        ("rules: [{id: a, regex: '(x'}]", "does not compile"),
        ("rules: [{id: a, regex: 'x', keywords: [ABC]}]", "lower-case"),
        ("rules: [{id: a, regex: 'x', category: email2}]", "unknown category"),
        ("rules: [{id: a, regex: 'x', check: luhn}]", "unknown check"),
        ("rules: [{id: a, regex: 'x'}, {id: a, regex: 'y'}]", "two rules are named"),
        ("placeholders: x\nrules: []", "is a list of patterns"),
        ("rules: 3", "must hold a list 'rules'"),
    ],
)
def test_a_broken_rules_file_is_named_with_its_mistake(tmp_path, rules, error):
    path = tmp_path / "secrets.yaml"
    path.write_text(rules)
    with pytest.raises(LLMasOSError, match=error):
        load_rules(path)


def test_a_rules_file_of_ones_own_is_a_guard(tmp_path):
    path = tmp_path / "secrets.yaml"
    path.write_text(
        "rules:\n  - {id: acme, regex: '\\bacme_[a-z0-9]{12}\\b', keywords: [acme_], entropy: 2.5}\n"
    )
    guard = secrets_guard(path)
    assert [f.category for f in guard.check("key acme_k3x9q2m7w1z8 here")] == ["api_key"]
    assert guard.check("key acme_aaaaaaaaaaaa here") == []  # under the entropy floor
