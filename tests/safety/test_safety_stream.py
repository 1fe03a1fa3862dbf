"""Streaming redaction: however the output is cut into deltas, what the stream emits adds up to
the redaction of the whole text, and no emitted prefix ever holds 4 characters of a value."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.errors import LLMasOSError
from llmasos.safety import Finding, GuardPipeline, Policy, StreamGuard, Vault, default_guards

KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAq2Hc7xYz\n-----END RSA PRIVATE KEY-----"
VALUES = {  # one value of every category, as it appears in TEXT
    "email": "john.doe@example.com",
    "phone": "+1 (650) 253-0000 ext. 12",
    "credit_card": "4111 1111 1111 1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "us_ssn": "536-22-1234",
    "uk_nino": "AB 12 34 56 C",
    "ip_address": "192.168.1.20",
    "street_address": "1600 Pennsylvania Avenue NW",
    "api_key": "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",
    "secret": "hunter2xyz",
    "private_key": KEY,
}
TEXT = (
    f"Dear team, write to {VALUES['email']} or call {VALUES['phone']} before noon.\n"
    f"Pay with {VALUES['credit_card']} 12/25 or to IBAN {VALUES['iban']}, ref 2024-01-15.\n"
    f"SSN {VALUES['us_ssn']}, NINO {VALUES['uk_nino']}; server {VALUES['ip_address']} runs version 1.2.3.4.\n"
    f"Ship to {VALUES['street_address']}, Washington. Token {VALUES['api_key']} and "
    f'password = "{VALUES["secret"]}".\n{VALUES["private_key"]}\nThanks!'
)
GUARDS = default_guards()


def windows(text: str, size: int = 4) -> set[str]:
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def leaked(emitted: str, values, redacted: str) -> set[str]:
    """The 4-character pieces of the values found in `emitted`, less those that the text around
    the values or the placeholders contain anyway."""
    scaffold = TEXT
    for value in values:
        scaffold = scaffold.replace(value, "\0")
    harmless = windows(scaffold) | windows(" ".join(re.findall(r"<[A-Z_]+_\w+>", redacted)))
    return {w for value in values for w in windows(value) - harmless if w in emitted}


def run_stream(pipeline, pieces, interval=8):
    """Feed the pieces; the emitted text after every delta, and the stream."""
    stream = StreamGuard(pipeline, interval=interval)
    emitted, prefixes = "", []
    for piece in pieces:
        emitted += stream.feed(piece)
        prefixes.append(emitted)
    emitted += stream.finish()
    prefixes.append(emitted)
    return prefixes, stream


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_the_text_has_every_category_and_the_whole_text_redaction_hides_them():
    verdict = GuardPipeline(GUARDS, Policy()).check_output(TEXT)
    assert {f.category for f in verdict.findings} == set(VALUES)
    assert "version 1.2.3.4" in verdict.text and "ref 2024-01-15" in verdict.text
    assert not leaked(verdict.text, VALUES.values(), verdict.text)


@settings(deadline=None, max_examples=60)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=120),
    style=st.sampled_from(["placeholder", "mask", "hash", "reversible"]),
    interval=st.integers(min_value=1, max_value=24),
)
def test_any_split_emits_exactly_the_whole_text_redaction_and_never_a_piece_of_a_value(cuts, style, interval):
    pipeline = GuardPipeline(GUARDS, Policy(redaction=style), vault=Vault(), owner="alice", salt=b"s")
    redacted = pipeline.check_output(TEXT).text  # the vault now knows the values: same placeholders
    prefixes, stream = run_stream(pipeline, split(TEXT, cuts), interval)
    assert prefixes[-1] == redacted
    assert not stream.blocked and stream.finish_reason is None
    for prefix in prefixes:
        assert redacted.startswith(prefix)
        assert not leaked(prefix, VALUES.values(), redacted)


@pytest.mark.parametrize("category", sorted(VALUES))
def test_a_value_fed_one_character_at_a_time_never_shows(category):
    value = VALUES[category]
    shown = f'password = "{value}"' if category == "secret" else value  # a secret is one by its name
    text = f"Here it is: {shown}\nand that was all."
    pipeline = GuardPipeline(GUARDS, Policy())
    prefixes, _ = run_stream(pipeline, list(text), interval=1)
    redacted = pipeline.check_output(text).text
    assert prefixes[-1] == redacted and value not in redacted
    harmless = windows(text.replace(value, "\0")) | windows(redacted)
    for prefix in prefixes:
        assert not {w for w in windows(value) - harmless if w in prefix}, prefix


def test_an_unfinished_value_is_held_back_and_text_before_it_flows():
    stream = StreamGuard(GuardPipeline(GUARDS, Policy()), interval=1)
    assert stream.feed("Hello there, mail john.doe@exa") == "Hello there, mail "
    assert stream.feed("mple.co") == ""  # ".co" may still become ".com"
    assert stream.feed("m and then some more words") == "<EMAIL_1> and then some more "
    assert stream.finish() == "words"


def test_a_blocked_category_ends_the_stream_before_it_with_content_filter():
    policy = Policy(actions={"credit_card": "block"})
    pipeline = GuardPipeline(GUARDS, policy)
    assert pipeline.check_output(TEXT).action == "block" and pipeline.check_output(TEXT).text == ""
    stream = StreamGuard(pipeline)
    emitted = "".join(stream.feed(TEXT[i : i + 3]) for i in range(0, len(TEXT), 3))
    redacted = GuardPipeline(GUARDS, Policy()).check_output(TEXT).text
    assert stream.blocked and stream.finish_reason == "content_filter"
    assert emitted == redacted[: redacted.index("<CREDIT_CARD_1>")]
    assert emitted.endswith("Pay with ")
    assert stream.feed("more text") == "" and stream.finish() == ""
    verdict = stream.verdict()
    assert verdict.action == "block" and verdict.text == emitted
    record = json.dumps(verdict.audit_record("key-1", "req-1"))
    assert not any(value in record for value in VALUES.values())


class LateGuard:
    """A guard without holdback that only sees a problem once a later word arrives."""

    name = "late"
    categories = ("secret",)

    def check(self, text: str) -> list[Finding]:
        return [Finding("secret", 0, 5, 1.0, self.name)] if "trigger" in text else []


def test_a_finding_over_text_already_sent_blocks_the_stream():
    stream = StreamGuard(GuardPipeline([LateGuard()], Policy()), interval=1)
    assert stream.feed("hello world ") == "hello world "
    assert stream.feed("trigger") == ""
    assert stream.blocked and stream.finish_reason == "content_filter"


def test_a_finished_stream_refuses_more_text():
    stream = StreamGuard(GuardPipeline(GUARDS, Policy()))
    assert stream.feed("all done") + stream.finish() == "all done"
    assert stream.finish() == ""
    with pytest.raises(LLMasOSError, match="finished"):
        stream.feed("more")
    with pytest.raises(LLMasOSError, match="interval"):
        StreamGuard(GuardPipeline(GUARDS, Policy()), interval=0)
