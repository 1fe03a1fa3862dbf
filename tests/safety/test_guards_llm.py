"""Guards on `LLM(guards=...)` and `llmasos run --guard-policy`: the server's semantics offline.

The tiny model is made to write PII with structured output (`choice`: the whole output is that
one string), so the real engine samples it token by token; unquoted text, unlike the server's
JSON, lets each guard's own holding back show: the words around a value stream out, the value
never does, not even in part.
"""

import logging
import re

import pytest
from typer.testing import CliRunner

from llmasos import LLM, SamplingParams
from llmasos.cli import app
from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.safety import Policy, PolicySet
from llmasos.safety.requests import ContentFilterError
from llmasos.sampling_params import StructuredOutputParams

from serving import ENGINE

EMAIL = "john.doe@example.com"
CARD = "4111 1111 1111 1111"
PROMPT = f"Please write to {EMAIL} about the order."
PLACEHOLDER = re.compile(r"<EMAIL_[0-9a-f]{10}>")


def forced(text: str, **options) -> SamplingParams:
    choice = StructuredOutputParams(choice=[text])
    return SamplingParams(max_tokens=96, temperature=0, structured_output=choice, **options)


def guarded(**policy) -> LLM:
    return LLM("tiny", guards=PolicySet(default=Policy(**policy)), **vars(ENGINE))


def leaked(text: str, value: str) -> set[str]:
    """The 4-character pieces of `value` in `text`: any part of the value that got out."""
    return {value[i : i + 4] for i in range(len(value) - 3)} & {text[i : i + 4] for i in range(len(text) - 3)}


@pytest.fixture(scope="module")
def redacting(store):
    return guarded()


@pytest.fixture(scope="module")
def plain(store):
    return LLM("tiny", **vars(ENGINE))


def test_generate_redacts_the_prompt_the_model_sees_and_the_output(redacting, plain):
    sentence = f"Write to {EMAIL} today"
    out = redacting.generate(PROMPT, forced(sentence))[0]
    assert out.prompt == "Please write to <EMAIL_1> about the order."
    completion = out.outputs[0]
    assert completion.text == "Write to <EMAIL_1> today" and completion.finish_reason == "stop"
    assert redacting.tokenizer.decode(completion.token_ids) == completion.text  # ids of what is shown
    raw = plain.generate(PROMPT, forced(sentence))[0]
    assert raw.outputs[0].text == sentence and len(raw.outputs[0].token_ids) > 15  # forced, in many tokens


def test_a_stream_never_emits_part_of_an_email_split_over_many_tokens(redacting):
    deltas = list(redacting.stream("Hello", forced(f"Write to {EMAIL} today, and to {EMAIL} again")))
    shown = "".join(deltas)
    assert shown == "Write to <EMAIL_1> today, and to <EMAIL_1> again"
    assert not leaked(shown, EMAIL)  # every delta, and so every prefix, is part of `shown`
    assert deltas[0].startswith("Write") and len(deltas) >= 4  # the rest streams; only the e-mail waits


def test_a_blocked_span_ends_generate_and_stream_with_content_filter(store):
    llm = guarded(actions={"credit_card": "block"})
    sentence = f"Card {CARD} and the many words that come after it"
    completion = llm.generate("Hello", forced(sentence))[0].outputs[0]
    assert completion.text == "Card " and completion.finish_reason == "content_filter"
    assert "".join(llm.stream("Hello", forced(sentence))) == "Card "
    assert not llm.engine.has_unfinished()  # the blocked stream was aborted in the engine


def test_a_blocked_prompt_raises_naming_the_category_never_the_text(store):
    llm = guarded(default_action="block")
    for call in (
        lambda: llm.generate(["Hi", PROMPT]),
        lambda: llm.chat([{"role": "user", "content": PROMPT}]),
        lambda: next(llm.stream(PROMPT)),
    ):
        with pytest.raises(ContentFilterError) as info:
            call()
        assert info.value.categories == ("email",) and "email" in str(info.value)
        assert not leaked(str(info.value), EMAIL)
    assert "prompt 1" in str(pytest.raises(ContentFilterError, llm.generate, ["Hi", PROMPT]).value)
    assert llm.generate("Hi", SamplingParams(max_tokens=2))[0].outputs[0].finish_reason == "length"


def test_chat_guards_each_message_not_the_rendered_template(redacting, caplog):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    with caplog.at_level(logging.INFO, logger="llmasos.guards"):
        out = redacting.chat(messages, SamplingParams(max_tokens=2))[0]
    assert "<|im_start|>user\nPlease write to <EMAIL_1> about the order.<|im_end|>" in out.prompt
    inputs = [r.audit for r in caplog.records if r.audit["stage"] == "input"]
    assert len(inputs) == 2  # one verdict per message
    assert [set(r["categories"]) for r in inputs] == [set(), {"email"}]  # no delimiter read as injection


def test_verdicts_go_to_the_log_with_one_request_id_and_no_text(redacting, caplog):
    with caplog.at_level(logging.INFO, logger="llmasos.guards"):
        redacting.generate(PROMPT, forced(f"Write to {EMAIL} today"))
    records = [r.audit for r in caplog.records]
    assert [(r["stage"], r["action"]) for r in records] == [("input", "redact"), ("output", "redact")]
    assert len({r["request_id"] for r in records}) == 1 and records[0]["key"] is None
    assert not any(leaked(r.getMessage(), EMAIL) for r in caplog.records)


def test_reversible_placeholders_are_restored_for_the_values_the_prompt_sent(store):
    llm = guarded(redaction="reversible")
    placeholder = PLACEHOLDER.search(llm.generate(PROMPT, SamplingParams(max_tokens=1))[0].prompt).group()
    deltas = list(llm.stream(PROMPT, forced(f"Mail {placeholder} now")))  # the model writes it back
    assert "".join(deltas) == f"Mail {EMAIL} now"
    assert not any("<" in d or "_" in d for d in deltas)  # never half a placeholder, held until whole
    other = llm.generate("Hello", forced(f"Mail {placeholder} now"))[0].outputs[0].text
    assert other == f"Mail {placeholder} now"  # a prompt without the value gets nothing back


def test_logprobs_are_refused_where_the_policy_may_change_the_output(redacting, store):
    with pytest.raises(InvalidRequestError, match="logprobs"):
        redacting.generate("Hi", SamplingParams(max_tokens=2, logprobs=1))
    auditing = guarded(default_action="allow")  # a policy that only audits keeps logprobs
    assert auditing.generate("Hi", SamplingParams(max_tokens=2, logprobs=1))[0].outputs[0].logprobs


def test_guards_take_a_policy_file_and_refuse_anything_else(store, tmp_path):
    (tmp_path / "policy.yaml").write_text("default: {default_action: block}\n")
    with pytest.raises(ContentFilterError):
        LLM("tiny", guards=tmp_path / "policy.yaml", **vars(ENGINE)).generate(PROMPT)
    with pytest.raises(LLMasOSError, match="PolicySet or the path"):
        LLM("tiny", guards={"default": {}}, **vars(ENGINE))


def test_llmasos_run_guard_policy(store, tmp_path):
    (tmp_path / "block.yaml").write_text("default: {default_action: block}\n")
    (tmp_path / "redact.yaml").write_text("default: {default_action: redact}\n")
    flags = ["run", "tiny", PROMPT, "--max-tokens", "2", "--raw", "--guard-policy"]
    blocked = CliRunner().invoke(app, [*flags, str(tmp_path / "block.yaml")])
    assert isinstance(blocked.exception, ContentFilterError)
    redacted = CliRunner().invoke(app, [*flags, str(tmp_path / "redact.yaml")])
    assert redacted.exit_code == 0 and "[guards, input: email: redact]" in redacted.stderr
