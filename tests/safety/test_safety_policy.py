"""Policies per key and per model, redaction styles, the vault, verdicts and their audit records."""

import json

import pytest
import regex

from llmasos.errors import LLMasOSError
from llmasos.safety import (
    GuardPipeline,
    PatternGuard,
    Policy,
    PolicySet,
    Recognizer,
    Redactor,
    Vault,
    default_guards,
)

GUARDS = default_guards()
REQUEST = "Please email jane.roe@example.com about card 4111 1111 1111 1111."
POLICIES = """
default: {default_action: redact}
models:
  "qwen*": {actions: {email: allow}}
  llama-3: {default_action: allow}
keys:
  support-bot: {redaction: placeholder}
  batch-job: {actions: {credit_card: block}}
  analytics: {default_action: allow, min_score: 0.9}
"""


@pytest.fixture
def policies(tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text(POLICIES)
    return PolicySet.load(path)


def test_the_same_request_is_redacted_blocked_or_allowed_by_key(policies):
    verdicts = {
        key: GuardPipeline(GUARDS, policies.policy_for(model="smollm2", key=key)).check_input(REQUEST)
        for key in ("support-bot", "batch-job", "analytics")
    }
    assert verdicts["support-bot"].action == "redact"
    assert verdicts["support-bot"].text == "Please email <EMAIL_1> about card <CREDIT_CARD_1>."
    assert verdicts["batch-job"].action == "block" and verdicts["batch-job"].text == ""
    assert verdicts["batch-job"].actions == {"email": "redact", "credit_card": "block"}
    assert verdicts["analytics"].action == "allow" and verdicts["analytics"].text == REQUEST
    assert all(v.stage == "input" for v in verdicts.values())


def test_key_overrides_model_overrides_default(policies):
    assert policies.policy_for("qwen3-0.6b", "batch-job").actions == {"credit_card": "block"}  # key wins
    assert policies.policy_for("qwen3-0.6b", "unknown-key").actions == {"email": "allow"}  # model pattern
    assert policies.policy_for("llama-3", None).default_action == "allow"  # exact model name
    assert policies.policy_for("smollm2", None) == policies.default
    assert policies.policy_for(None, None).default_action == "redact"
    model_only = GuardPipeline(GUARDS, policies.policy_for("qwen3-0.6b", None)).check_output(REQUEST)
    assert model_only.text == "Please email jane.roe@example.com about card <CREDIT_CARD_1>."


def test_a_json_policy_file_loads_too(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"keys": {"k": {"actions": {"phone": "block"}, "redaction": "mask"}}}))
    policy = PolicySet.load(path).policy_for(key="k")
    assert policy.action_for("phone") == "block" and policy.redaction == "mask"


@pytest.mark.parametrize(
    "text, message",
    [
        ("keys:\n  team-a: {actions: {emial: redact}}\n", r"keys\.team-a: unknown category 'emial'; known"),
        ("default: {actions: {email: delete}}\n", r"default: the action for 'email' is 'delete'; use one of"),
        (
            "default: {default_action: deny}\n",
            r"default: default_action is 'deny'; use one of allow, redact, block",
        ),
        ("models:\n  m: {acton: {}}\n", r"models\.m: unknown policy fields \['acton'\]"),
        ("default: {redaction: blur}\n", r"unknown redaction style 'blur'; use one of mask, placeholder"),
        ("default: {min_score: 2}\n", r"min_score must be a number from 0 to 1"),
        ("default: {actions: [email]}\n", r"actions must map categories to actions"),
        ("keys: [a, b]\n", r"keys must map names to policies"),
        ("policies: {}\n", r"unknown top-level fields \['policies'\]"),
        ("- just a list\n", r"a policy set is a mapping"),
        ("default: {actions: {email: redact}\n", r"does not parse"),
    ],
)
def test_policy_file_errors_name_the_entry_and_the_fix(tmp_path, text, message):
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    with pytest.raises(LLMasOSError, match=message) as error:
        PolicySet.load(path)
    assert str(path) in str(error.value)


def test_a_missing_policy_file_is_a_clear_error(tmp_path):
    with pytest.raises(LLMasOSError, match="cannot read the policy file .*nope.yaml"):
        PolicySet.load(tmp_path / "nope.yaml")


def test_reversible_placeholders_restore_for_their_owner_only():
    vault = Vault()
    alice = GuardPipeline(GUARDS, Policy(redaction="reversible"), vault=vault, owner="alice")
    bob = GuardPipeline(GUARDS, Policy(redaction="reversible"), vault=vault, owner="bob")
    hidden = alice.check_output(REQUEST).text
    assert "jane.roe" not in hidden and "4111" not in hidden
    assert regex.fullmatch(
        r"Please email <EMAIL_[0-9a-f]{10}> about card <CREDIT_CARD_[0-9a-f]{10}>\.", hidden
    )
    assert vault.restore(hidden, "alice") == REQUEST
    assert vault.restore(hidden, "bob") == hidden
    assert vault.restore(hidden, "mallory") == hidden
    assert alice.check_output(REQUEST).text == hidden  # one value, one placeholder, for one owner
    assert bob.check_output(REQUEST).text != hidden  # and a different one for another owner
    with pytest.raises(LLMasOSError, match="needs a Vault and an owner"):
        GuardPipeline(GUARDS, Policy(redaction="reversible"))


def test_the_vault_forgets_the_least_recently_used_value_first():
    vault = Vault(max_entries=2)
    first = vault.placeholder("alice", "email", "a@example.com")
    second = vault.placeholder("alice", "email", "b@example.com")
    assert vault.placeholder("alice", "email", "a@example.com") == first  # used again: now the newest
    third = vault.placeholder("alice", "email", "c@example.com")
    assert vault.restore(f"{first} {second} {third}", "alice") == f"a@example.com {second} c@example.com"


def test_redaction_styles():
    text = "from a@example.com to b@example.com, cc a@example.com"
    placeholder = GuardPipeline(GUARDS, Policy()).check_output(text).text
    assert placeholder == "from <EMAIL_1> to <EMAIL_2>, cc <EMAIL_1>"
    assert (
        GuardPipeline(GUARDS, Policy(redaction="mask")).check_output(text).text
        == "from **** to ****, cc ****"
    )
    hashed = GuardPipeline(GUARDS, Policy(redaction="hash"), salt=b"one").check_output(text).text
    first, second, third = regex.findall(r"<EMAIL_[0-9a-f]{12}>", hashed)
    assert first == third != second
    assert GuardPipeline(GUARDS, Policy(redaction="hash"), salt=b"one").check_output(text).text == hashed
    assert GuardPipeline(GUARDS, Policy(redaction="hash"), salt=b"two").check_output(text).text != hashed
    with pytest.raises(LLMasOSError, match="unknown redaction style"):
        Redactor("blur")


def test_overlapping_findings_are_redacted_as_one_span_under_the_strictest_action():
    text = 'config: password = "bob@example.com"'
    policy = Policy(actions={"email": "allow", "secret": "redact"})
    verdict = GuardPipeline(GUARDS, policy).check_output(text)
    assert {f.category for f in verdict.findings} == {"email", "secret"}
    assert verdict.text == 'config: password = "<SECRET_1>"'
    assert verdict.action == "redact"


def test_min_score_drops_weak_findings():
    text = "Ship to 742 Evergreen Terrace, mail homer@example.com"
    loose = GuardPipeline(GUARDS, Policy()).check_output(text)
    strict = GuardPipeline(GUARDS, Policy(min_score=0.8)).check_output(text)
    assert {f.category for f in loose.findings} == {"street_address", "email"}
    assert {f.category for f in strict.findings} == {"email"}
    assert strict.text == "Ship to 742 Evergreen Terrace, mail <EMAIL_1>"


def test_the_audit_record_has_categories_actions_counts_and_offsets_but_no_content():
    verdict = GuardPipeline(GUARDS, Policy(actions={"credit_card": "block"})).check_output(REQUEST)
    record = verdict.audit_record("support-bot", "req-42")
    assert record["key"] == "support-bot" and record["request_id"] == "req-42" and record["time"]
    assert (record["event"], record["stage"], record["action"]) == ("guard", "output", "block")
    assert record["categories"] == {
        "credit_card": {"action": "block", "count": 1},
        "email": {"action": "redact", "count": 1},
    }
    spans = [(f["category"], f["start"], f["end"], f["guard"]) for f in record["findings"]]
    email_at = REQUEST.index("jane")
    assert ("email", email_at, email_at + len("jane.roe@example.com"), "pii") in spans
    line = json.dumps(record)
    assert "jane.roe" not in line and "4111" not in line and "example.com" not in line


def test_guards_and_pipelines_refuse_unknown_categories_and_duplicate_names():
    with pytest.raises(LLMasOSError, match="unknown categories \\['ssn'\\]; add them to CATEGORIES"):
        PatternGuard("mine", [Recognizer("ssn", regex.compile(r"\d{9}"), 0.9)])
    with pytest.raises(LLMasOSError, match="two guards share a name"):
        GuardPipeline([GUARDS[0], GUARDS[0]], Policy())
    with pytest.raises(LLMasOSError, match="unknown category 'ssn'"):
        Policy(actions={"ssn": "block"})
