"""Guards in the server, through the `openai` client against a live server on 127.0.0.1.

A tiny random model never writes PII by itself, so the tests make it: `response_format` with a
JSON schema whose `const` is a sentence holding an e-mail or a card number. The real engine then
samples that sentence token by token under the grammar (the tiny tokenizer cuts the e-mail into
more than ten tokens), and every output passes the real server path: gateway, guards, stream
chunks, SSE. The same request under a key whose policy allows everything shows the PII, so the
forcing is real and the guards are what hide it.
"""

import dataclasses
import json
import re

import openai
import pytest

from llmasos.serve.keys import KeyStore

from serving import LiveServer, server_config

EMAIL = "john.doe@example.com"
CARD = "4111 1111 1111 1111"
PROMPT = f"Please write to {EMAIL} about the order."
POLICY = """
default: {default_action: redact}
keys:
  alice: {default_action: redact}
  bob: {default_action: block}
  carol: {default_action: allow}
  dora: {redaction: reversible}
  erin: {redaction: reversible}
  frank: {actions: {credit_card: block}}
"""


def forced(value) -> dict:
    """The body fields that make the model write `value` as JSON (a string in its quotes)."""
    schema = {"type": "array" if isinstance(value, list) else "string", "const": value}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "forced", "schema": schema}}}


def windows(value: str, size: int = 4) -> set[str]:
    return {value[i : i + size] for i in range(len(value) - size + 1)}


def leaked(text: str, value: str, size: int = 4) -> set[str]:
    """The `size`-character pieces of `value` in `text`: any part of the value that got out."""
    return {w for w in windows(value, size) if w in text}


@pytest.fixture(scope="module")
def home(store):
    (store.home / "policy.yaml").write_text(POLICY)
    return store.home


@pytest.fixture(scope="module")
def secrets(home):
    keys = KeyStore(home / "keys.json")
    return {name: keys.add(name)[1] for name in ("alice", "bob", "carol", "dora", "erin", "frank")}


@pytest.fixture(scope="module")
def server(home, secrets):
    config = server_config(["tiny"], home, guard_policy=home / "policy.yaml")
    with LiveServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def client(server, secrets):
    def as_key(name: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key=secrets[name], max_retries=0)

    return as_key


def complete(client, prompt=PROMPT, max_tokens=64, **extra):
    """The one choice of a completion that echoes its prompt as the model saw it."""
    return client.completions.create(
        model="tiny", prompt=prompt, echo=True, max_tokens=max_tokens, temperature=0, extra_body=extra or None
    ).choices[0]


def stream_chat(client, value, **options) -> tuple[dict[int, list[str]], dict[int, str], object]:
    """The content deltas and finish_reason of each choice, and the usage."""
    chunks = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=96,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=forced(value),
        **options,
    )
    deltas, finish, usage = {}, {}, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            deltas.setdefault(choice.index, []).append(choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return deltas, finish, usage


def test_one_request_is_redacted_for_one_key_blocked_for_another_allowed_for_a_third(client):
    sentence = f"Sent to {EMAIL}."
    redacted = complete(client("alice"), **forced(sentence))
    assert (
        redacted.text == 'Please write to <EMAIL_1> about the order."Sent to <EMAIL_1>."'
    )  # echo: what the model saw
    assert redacted.finish_reason == "stop"

    with pytest.raises(openai.BadRequestError) as info:
        complete(client("bob"), **forced(sentence))
    error = info.value.body
    assert error["code"] == "content_filter" and error["param"] == "prompt"
    assert "email" in error["message"] and not leaked(error["message"], EMAIL)

    allowed = complete(client("carol"), **forced(sentence))
    assert allowed.text == f'{PROMPT}"{sentence}"'


def test_token_id_prompts_are_guarded_as_their_text(client, server):
    tokenizer = server.state.registry.loaded["tiny"].served.tokenizer
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    choice = client("alice").completions.create(model="tiny", prompt=ids, echo=True, max_tokens=1)
    assert choice.choices[0].text.startswith("Please write to <EMAIL_1> about the order.")


def test_a_streamed_email_split_over_many_tokens_is_never_emitted_even_partially(client):
    value = ["Write to", EMAIL, "today"]  # an array: the text around the e-mail streams on its own
    deltas, finish, usage = stream_chat(client("alice"), value, n=2)
    assert usage.completion_tokens >= 2 * 30  # the e-mail came out of the engine in many tokens
    for index in (0, 1):  # each choice has a guard of its own
        shown = "".join(deltas[index])  # every delta, and so every prefix, is part of it
        assert shown == '["Write to", "<EMAIL_1>", "today"]' and finish[index] == "stop"
        assert not leaked(shown, EMAIL)
        assert len([d for d in deltas[index] if d]) >= 3  # streamed in pieces, not held to the end

    control, _, _ = stream_chat(client("carol"), value)
    assert "".join(control[0]) == json.dumps(value)  # without guards the model does write it


def test_a_blocked_span_ends_the_stream_with_content_filter_before_it(client):
    value = ["Card", CARD, "and the many words that come after it"]
    deltas, finish, usage = stream_chat(client("frank"), value)
    assert "".join(deltas[0]) == '["Card", "' and finish == {0: "content_filter"}
    control, _, whole_usage = stream_chat(client("carol"), value)
    assert "".join(control[0]) == json.dumps(value)
    # the engine stopped soon after the block (once the guards had settled the card), not at the end
    assert usage.completion_tokens < whole_usage.completion_tokens - 10

    whole = client("frank").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=64, extra_body=forced(value)
    )
    assert (
        whole.choices[0].message.content == '["Card", "'
        and whole.choices[0].finish_reason == "content_filter"
    )


def test_reversible_placeholders_come_back_to_the_key_that_sent_them_only(client):
    echo = complete(client("dora"), max_tokens=1).text
    placeholder = re.search(r"<EMAIL_[0-9a-f]{10}>", echo).group()
    assert EMAIL not in echo  # the model saw the placeholder

    restored = complete(client("dora"), **forced(placeholder))  # the model writes the placeholder
    assert restored.text.endswith(f'"{EMAIL}"')
    deltas, _, _ = stream_chat(client("dora"), placeholder)  # no e-mail in this prompt: not restored
    assert "".join(deltas[0]) == f'"{placeholder}"'

    other = complete(client("erin"), **forced(placeholder))  # erin sent the e-mail too, but owns another
    assert other.text.endswith(f'"{placeholder}"') and placeholder not in other.text[: len(PROMPT)]


def test_a_streamed_placeholder_comes_back_restored(client):
    """(Inside a JSON string the secrets guard holds the placeholder back whole; the restore's own
    holding back of half a placeholder is shown in test_guards_llm.py, on unquoted text.)"""
    as_dora = client("dora")
    placeholder = re.search(r"<EMAIL_[0-9a-f]{10}>", complete(as_dora, max_tokens=1).text).group()
    chunks = as_dora.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=64, temperature=0, stream=True, extra_body=forced(placeholder)
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == f'"{EMAIL}"'
    assert not any("<EMAIL" in piece or "_" in piece for piece in pieces)


def test_logprobs_are_refused_where_the_policy_may_change_the_output(client):
    with pytest.raises(openai.BadRequestError) as info:
        client("alice").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, logprobs=True
        )
    assert "logprobs" in info.value.body["message"]
    allowed = client("carol").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, logprobs=True
    )
    assert len(allowed.choices[0].logprobs.content) == 2


def test_verdicts_are_audited_with_key_request_and_categories_never_the_text(home, secrets, tmp_path):
    config = server_config(["tiny"], home, guard_policy=home / "policy.yaml")
    config = dataclasses.replace(config, audit_file=tmp_path / "audit.jsonl")  # this test's lines only
    with LiveServer(config) as server:
        as_key = {name: openai.OpenAI(base_url=f"{server.url}/v1", api_key=secrets[name], max_retries=0)
                  for name in ("alice", "bob")}  # fmt: skip
        complete(as_key["alice"], **forced(f"Sent to {EMAIL}."))
        with pytest.raises(openai.BadRequestError):
            complete(as_key["bob"])
    text = (tmp_path / "audit.jsonl").read_text()
    assert not leaked(text, EMAIL, size=5) and "Please write" not in text  # 4: "mple" of "completion"
    records = [json.loads(line) for line in text.splitlines()]
    requests = {r["key"]: r for r in records if r.get("route") == "/v1/completions"}
    verdicts = [r for r in records if r.get("event") == "guard"]
    assert requests["bob"]["status"] == 400 and requests["alice"]["status"] == 200
    by_request = {(r["key"], r["stage"]): r for r in verdicts}
    assert len(verdicts) == 3 and set(by_request) == {
        ("alice", "input"),
        ("alice", "output"),
        ("bob", "input"),
    }
    for (key, _stage), verdict in by_request.items():
        assert verdict["request_id"] == requests[key]["request_id"] is not None
        assert verdict["categories"] == {
            "email": {"action": "block" if key == "bob" else "redact", "count": 1}
        }
        assert verdict["action"] == ("block" if key == "bob" else "redact")
        assert all(
            set(f) == {"category", "action", "start", "end", "score", "guard"} for f in verdict["findings"]
        )
